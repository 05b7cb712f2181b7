"""Jinja2 rendering of a proxy's files (Envoy bootstrap, systemd units) and a host's nftables table.

One Environment (StrictUndefined) over the repository's `templates/`, a frozen context per template, and every
output parsed back before it is returned; it must not compute config (mesh.config) or touch a host.

The templates live at the repository root (`templates/`, beside `mesh/`): an editable install or a checkout
finds them; a wheel does not ship them (controller hosts install mesh from a wheel only to run the health
checker, which renders nothing). Pass `templates_dir` to render from elsewhere.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import yaml

from mesh import package_data
from mesh.config import paths
from mesh.config.consistent import consistent
from mesh.config.errors import ConfigError
from mesh.config.model import ProxyConfig
from mesh.config.validate import validate_envoy_config
from mesh.inventory.model import ManagedHost

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

TEMPLATES_DIR = package_data.templates_dir()

__all__ = ["EnvoyConfigContext", "EnvoyUnitContext", "FirewallContext", "FirewallUnitContext",
           "render_envoy_config", "render_envoy_unit", "render_firewall", "render_firewall_unit",
           "template_environment", "validate_envoy_config"]


@dataclass(frozen=True)
class EnvoyConfigContext:
    """templates/envoy/envoy.yaml.j2: the whole proxy config."""

    cfg: ProxyConfig


@dataclass(frozen=True)
class EnvoyUnitContext:
    """templates/systemd/mesh-envoy.service.j2."""

    proxy: str
    node_id: str
    host: str
    user: str
    binary: str
    config_path: str
    base_id: int
    admin_dir: str


@dataclass(frozen=True)
class FirewallContext:
    """templates/nftables/firewall.nft.j2: the app ports to close to other hosts."""

    host: str
    nft: str
    app_ports: tuple[int, ...]


@dataclass(frozen=True)
class FirewallUnitContext:
    """templates/systemd/mesh-firewall.service.j2."""

    nft: str
    ruleset_path: str


def render_envoy_config(cfg: ProxyConfig, templates_dir: Path = TEMPLATES_DIR) -> str:
    """The Envoy bootstrap (YAML) of one proxy; refuses an inconsistent config first."""
    consistent(cfg)
    text = _render(templates_dir, "envoy/envoy.yaml.j2", EnvoyConfigContext(cfg))
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as error:  # a template bug, but name the proxy
        raise ConfigError(cfg.proxy, f"rendered Envoy config is not YAML: {error}") from error
    if not isinstance(parsed, dict) or "static_resources" not in parsed:
        raise ConfigError(cfg.proxy, "rendered Envoy config has no static_resources")
    return text


def render_envoy_unit(cfg: ProxyConfig, templates_dir: Path = TEMPLATES_DIR) -> str:
    """The hardened systemd unit running this proxy's Envoy (installed at paths.envoy_unit_path)."""
    context = EnvoyUnitContext(proxy=cfg.proxy, node_id=cfg.node_id, host=cfg.host, user=paths.ENVOY_USER,
                               binary=paths.ENVOY_BINARY, config_path=cfg.config_path, base_id=cfg.base_id,
                               admin_dir=paths.admin_dir(cfg.proxy))
    return _parsed_unit(_render(templates_dir, "systemd/mesh-envoy.service.j2", context))


def render_firewall(host: ManagedHost, templates_dir: Path = TEMPLATES_DIR) -> str:
    """The nft script of mesh's `inet mesh` table: drop non-loopback tcp to the host's app ports."""
    ports = tuple(sorted({workload.port for workload in host.workloads}))
    text = _render(templates_dir, "nftables/firewall.nft.j2", FirewallContext(host.name, paths.NFT_BINARY, ports))
    if text.count("table inet mesh {") != 1:
        raise ConfigError(host.name, "rendered firewall does not declare exactly one `inet mesh` table")
    return text


def render_firewall_unit(templates_dir: Path = TEMPLATES_DIR) -> str:
    """The oneshot `mesh-firewall.service` that loads the table at boot."""
    context = FirewallUnitContext(paths.NFT_BINARY, paths.FIREWALL_PATH)
    return _parsed_unit(_render(templates_dir, "systemd/mesh-firewall.service.j2", context))


def template_environment(templates_dir: Path = TEMPLATES_DIR) -> jinja2.Environment:
    """The one Environment mesh renders with (cached per folder; Environments are safe to share)."""
    return _environment(str(templates_dir))


@cache
def _environment(templates_dir: str) -> jinja2.Environment:
    if not Path(templates_dir, "envoy").is_dir():
        raise FileNotFoundError(f"mesh's templates are not at {templates_dir}: render from a checkout "
                                "or an editable install (wheels do not ship them)")
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir), undefined=jinja2.StrictUndefined,
                                     keep_trailing_newline=True, autoescape=False)
    environment.filters["seconds"] = _seconds
    return environment


def _render(templates_dir: Path, name: str, context: DataclassInstance) -> str:
    """Render with the context's fields as the template's only names (StrictUndefined refuses others)."""
    names = {field.name: getattr(context, field.name) for field in fields(context)}
    return template_environment(templates_dir).get_template(name).render(names)


def _seconds(milliseconds: int) -> str:
    """A protobuf Duration in YAML: 1000 -> "1s", 800 -> "0.8s"."""
    return f"{milliseconds / 1000:g}s"


def _parsed_unit(text: str) -> str:
    """Parse a unit back (INI-like); a unit without its sections is a template bug."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    missing = {"Unit", "Service", "Install"} - set(parser.sections())
    if missing:
        raise ValueError(f"rendered unit lacks section(s) {sorted(missing)}")
    return text
