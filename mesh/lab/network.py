"""The lab's network on the host: one bridge, and per node a network namespace joined to it by a veth.
Every link it makes carries the alias `mesh-lab`, so leftovers are found by that mark and nothing else is touched.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import structlog

from mesh.lab.errors import LabError, run

MARK = "mesh-lab"
NETNS_PREFIX = "mesh-lab-"
log = structlog.get_logger("mesh.lab.network")


def _links() -> list[dict[str, object]]:
    return json.loads(run(["ip", "-j", "-d", "link", "show"]).stdout or "[]")


def _lab_links() -> dict[str, dict[str, object]]:
    return {str(link["ifname"]): link for link in _links() if link.get("ifalias") == MARK}


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def lab_netns_names() -> list[str]:
    """Namespaces named by the lab's prefix (only the lab makes them: the prefix is the lab's mark)."""
    found = run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    names = [str(entry["name"]) for entry in json.loads(found or "[]")]
    return sorted(name for name in names if name.startswith(NETNS_PREFIX))


def check_free(bridge: str, subnet: str) -> None:
    """Refuse when the bridge name or the subnet is used by something that is not the lab."""
    links = {str(link["ifname"]): link for link in _links()}
    if bridge in links and links[bridge].get("ifalias") != MARK:
        raise LabError(f"a network interface named {bridge} exists and is not the lab's",
                       hint=f"remove it (ip link del {bridge}) or free the name")
    network = ipaddress.ip_network(subnet)
    addresses = json.loads(run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]")
    for link in addresses:
        if link.get("ifname") == bridge:
            continue
        for info in link.get("addr_info", []):
            here = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network
            if here.overlaps(network):
                raise LabError(f"the lab subnet {subnet} is in use on {link['ifname']} ({info['local']})",
                               hint="remove that address or network first")
    routes = json.loads(run(["ip", "-j", "-4", "route", "show"]).stdout or "[]")
    for route in routes:
        if route.get("dev") == bridge or route.get("dst") in (None, "default"):
            continue
        if ipaddress.ip_network(str(route["dst"]), strict=False).overlaps(network):
            raise LabError(f"the lab subnet {subnet} overlaps the route {route['dst']} on {route.get('dev')}",
                           hint="remove that route or network first")


def ensure_bridge(bridge: str, host_address: str, prefix: int) -> bool:
    """Create the bridge with the host's address on it; return whether anything changed."""
    if bridge in _lab_links():
        return False
    run(["ip", "link", "add", bridge, "type", "bridge"])
    run(["ip", "link", "set", bridge, "alias", MARK])
    # the host speaks to nodes over IPv4 only; no router advertisements or link-local chatter from the bridge
    run(["sysctl", "-q", "-w", f"net.ipv6.conf.{bridge}.disable_ipv6=1"], check=False)
    run(["ip", "addr", "add", f"{host_address}/{prefix}", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])
    log.info("bridge created", bridge=bridge, address=host_address)
    return True


def ensure_node_link(netns: str, veth: str, bridge: str, address: str, prefix: int) -> bool:
    """A namespace whose eth0 (the peer of `veth` on the bridge) has the node's address; no default route."""
    changed = False
    if not netns_exists(netns):
        run(["ip", "netns", "add", netns])
        changed = True
    links = _lab_links()
    if veth in links and links[veth].get("master") != bridge:
        # the bridge was made again (removed by hand?): attach the node to it
        run(["ip", "link", "set", veth, "master", bridge, "up"])
        changed = True
    if veth not in links:
        run(["ip", "link", "del", veth], check=False)
        run(["ip", "-n", netns, "link", "del", "eth0"], check=False)
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
        run(["ip", "link", "set", veth, "alias", MARK])
        run(["ip", "link", "set", veth, "master", bridge, "up"])
        run(["ip", "-n", netns, "addr", "add", f"{address}/{prefix}", "dev", "eth0"])
        run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        changed = True
    return changed


def netns_pids(netns: str) -> list[int]:
    if not netns_exists(netns):
        return []
    found = run(["ip", "netns", "pids", netns], check=False).stdout.split()
    return [int(pid) for pid in found if pid.isdigit()]


def delete_node_link(netns: str, veth: str) -> list[str]:
    removed = []
    if veth in _lab_links():
        run(["ip", "link", "del", veth], check=False)
        removed.append(f"link {veth}")
    if netns_exists(netns):
        run(["ip", "netns", "del", netns])
        removed.append(f"netns {netns}")
    return removed


def delete_leftovers(bridge: str) -> list[str]:
    """Remove every namespace and link the lab's marks name, the bridge last; return what was removed."""
    removed = []
    for netns in lab_netns_names():
        run(["ip", "netns", "del", netns], check=False)
        removed.append(f"netns {netns}")
    links = _lab_links()
    for name in sorted(links, key=lambda n: n == bridge):
        run(["ip", "link", "del", name], check=False)
        removed.append(f"link {name}")
    return removed
