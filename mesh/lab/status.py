"""`mesh lab status`: what each node says about itself over SSH (booted, sshd, docker, its apps), in parallel.
It only reads: it starts, stops and writes nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mesh.lab import demo_units
from mesh.lab.layers import demo_instance
from mesh.lab.lifecycle import Lab
from mesh.lab.nodes import running
from mesh.lab.topology import Node

PROBE = """
echo "booted=$(systemctl is-system-running 2>/dev/null)"
echo "sshd=$(systemctl is-active ssh 2>/dev/null)"
echo "docker=$(systemctl is-active docker 2>/dev/null)"
echo "units=$(systemctl list-units --state=active --no-legend --plain 'mesh-demo-*' consul.service \
    2>/dev/null | cut -d' ' -f1 | tr '\\n' ' ')"
echo "containers=$(docker ps --format '{{.Names}}' 2>/dev/null | tr '\\n' ' ')"
"""


@dataclass(frozen=True)
class NodeStatus:
    name: str
    address: str
    booted: str
    sshd: str
    docker: str
    runs: str


def _expected(node: Node) -> list[tuple[str, str]]:
    """(what, the unit or container that shows it running) for each thing the lab placed on the node."""
    if node.role == "consul":
        return [("consul server :8500", "consul.service")]
    found = []
    for workload in node.workloads:
        label = f"{workload.service} {workload.version} :{workload.port}" + (" (spare)" if workload.spare else "")
        if workload.container:
            found.append((f"{label} ({workload.container})", workload.container))
        else:
            found.append((label, demo_units.unit_name(demo_instance(node, workload))))
    return found


def node_status(lab: Lab, node: Node, alive: bool) -> NodeStatus:
    if not alive:
        return NodeStatus(node.name, node.address, "stopped", "-", "-", "-")
    result = lab.ssh.run(node.address, [PROBE], timeout=15)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["ssh failed"])[-1]
        return NodeStatus(node.name, node.address, f"unreachable: {reason}", "-", "-", "-")
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    live = set(facts.get("units", "").split()) | set(facts.get("containers", "").split())
    runs = ", ".join(f"{what} {'up' if name in live else 'DOWN'}" for what, name in _expected(node)) or "-"
    docker = facts.get("docker", "") if node.role == "container_host" else "-"
    return NodeStatus(node.name, node.address, facts.get("booted", "?"), facts.get("sshd", "?"), docker, runs)


def lab_status(lab: Lab) -> list[NodeStatus]:
    record = lab.require_record()
    topology = lab.topology(record)
    alive = {name: running(entry, lab.files(name)) for name, entry in record.nodes.items()}
    with ThreadPoolExecutor(max_workers=len(topology.nodes)) as pool:
        return list(pool.map(lambda node: node_status(lab, node, alive.get(node.name, False)), topology.nodes))
