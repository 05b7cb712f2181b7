"""Addresses in Envoy's config: an IP literal Envoy connects to as it is, or a name it must resolve (a cluster of
names is STRICT_DNS, of literals STATIC). Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from mesh.config.model import Discovery


def is_ip(address: str) -> bool:
    """An IP address literal (v4 or v6), not a name Envoy would have to resolve."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def discovery_type(addresses: Iterable[str]) -> Discovery:
    """STATIC when every address is an IP literal, else STRICT_DNS."""
    return "STATIC" if all(is_ip(address) for address in addresses) else "STRICT_DNS"
