"""Reads `mesh_metrics_scrapers` (inventory host and group names) into the addresses allowed to reach every
proxy's metrics port, and checks each such address (a scraper's or a controller's) for the firewall rules it
goes into. It owns the names' resolution (groups recursively, as Ansible's `groups[NAME]`); it must not read
files or decide how hosts are reached (connection.py does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mesh.inventory.data import InventoryData
from mesh.inventory.located import Located, Problems
from mesh.inventory.templating import hosts_under
from mesh.inventory.values import BadValue, check_metrics_source, describe
from mesh.suggest import did_you_mean

SCRAPERS_KEY = "mesh_metrics_scrapers"
LIST_EXPECTED = "a list of inventory host or group names, such as [monitoring]"

# A host's address as Ansible connects to it: its ansible_ssh_host / ansible_host (rendered, where written), or,
# when neither is set, its name (at the host's own line).
AddressOf = Callable[[str], Located]


class MetricsSources:
    """Checks the addresses allowed to reach the metrics ports, each host once, every problem to problems."""

    def __init__(self, address_of: AddressOf, problems: Problems) -> None:
        self._address_of = address_of
        self._problems = problems
        self._checked: dict[str, str | None] = {}

    def address(self, host: str, why: str) -> str | None:
        """The host's address, or None once the problem is recorded; why says how the host may reach the
        metrics ports (it leads the message)."""
        if host not in self._checked:
            spot = self._address_of(host)
            try:
                self._checked[host] = check_metrics_source(spot.value)
            except BadValue as exc:
                self._checked[host] = None
                self._problems.at(spot, f"{why}, so its address goes into every host's firewall rules: {exc}",
                                  "set ansible_host to the host's IP address or a plain DNS name")
        return self._checked[host]


def read_metrics_scrapers(data: InventoryData, where: Located, sources: MetricsSources,
                          problems: Problems) -> tuple[str, ...]:
    """The scrapers' addresses in the order written (a group's hosts in Ansible's order), deduplicated."""
    if not isinstance(where.value, list):
        hint = ("write a YAML list such as [monitoring]; in INI a [vars] value is always a string: set it in "
                "group_vars/all.yml" if isinstance(where.value, str) else None)
        problems.at(where, f"expected {LIST_EXPECTED}, got {describe(where.value)}", hint)
        return ()
    names = [*data.groups, *data.hosts]
    addresses: dict[str, None] = {}
    for index in range(len(where.value)):
        item = where.child(index)
        for host in _hosts_named(data, item, names, problems):
            address = sources.address(host, f"{host} is a metrics scraper ({item.key} {item.value!r} at "
                                            f"{item.origin})")
            if address is not None:
                addresses[address] = None
    return tuple(addresses)


def _hosts_named(data: InventoryData, item: Located, names: Iterable[str], problems: Problems) -> list[str]:
    """The hosts an item names: a group's hosts (a group wins over a host of the same name, as in Ansible's
    patterns), or the one host."""
    name = item.value
    if not isinstance(name, str) or not name:
        problems.at(item, f"expected a host or group name, got {describe(name)}")
        return []
    if name in data.groups:
        return hosts_under(data, name)
    if name in data.hosts:
        return [name]
    problems.at(item, f"no host or group of the inventory is named {name!r}", did_you_mean(name, names))
    return []
