"""The `mesh lab` commands: parse options, call the Lab object once, print. Linux and root only.
No lab logic here: lifecycle.py does the work, status.py reads the nodes.
"""

from __future__ import annotations

from pathlib import Path

import click

from mesh.lab.state import LabPaths
from mesh.lab.topology import LabSize


def _progress(message: str) -> None:
    click.echo(f"... {message}", err=True)


def _lab():  # type: ignore[no-untyped-def]
    from mesh.lab.lifecycle import Lab, preflight

    preflight()  # Linux, root and the host's tools, before anything reads the state
    return Lab(LabPaths.from_env(), progress=_progress)


@click.group()
def lab() -> None:
    """A real multi-node fleet on this machine: nspawn VMs, a Docker host and Consul (Linux, root).

    State lives in /var/lib/mesh-lab (MESH_LAB_STATE overrides it), the cached rootfs and images in
    /var/cache/mesh-lab (MESH_LAB_CACHE), so any clone of the repository finds the lab that is up.
    """


@lab.command("up")
@click.option("--vms", default=3, show_default=True, help="VMs vm1..vmN (2 or more).")
@click.option("--containers", default=2, show_default=True, help="Demo app containers on dock1.")
@click.option("--controllers", default=1, show_default=True, help="Controller hosts ctl1..ctlK.")
@click.option("--inventory", "inventory", default="inventory/lab.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Where to write the lab's inventory.")
def up(vms: int, containers: int, controllers: int, inventory: Path) -> None:
    """Bring the lab up: consul1, ctl1..ctlK, vm1..vmN and dock1, with the demo app placed and started.

    Idempotent: run again with the same sizes, it starts only what is missing and says when nothing changed.
    It does not resize a running lab: with other sizes it refuses (run `mesh lab down` first). An interrupted
    `up` is finished by the next `up` of the same sizes, or removed by `down` or by an `up` of other sizes.
    """
    result = _lab().up(LabSize(vms, containers, controllers), inventory.absolute())
    if result.changes:
        click.echo(f"lab up in {result.seconds:.1f} s: {len(result.changes)} change(s)")
        for change in result.changes:
            click.echo(f"  {change}")
    else:
        click.echo(f"lab already up, nothing changed ({result.seconds:.1f} s)")
    click.echo(f"inventory: {result.inventory}")


@lab.command("down")
def down() -> None:
    """Remove everything the lab made: nodes, supervisors, mounts, namespaces, bridge, veths, Docker state,
    cgroup directories, /dev/shm/envoy_*, sysctls it changed, its state files and inventory."""
    removed = _lab().down()
    if not removed:
        click.echo("no lab on this machine: nothing to remove")
        return
    click.echo(f"lab down: removed {len(removed)} item(s)")
    for item in removed:
        click.echo(f"  {item}")


@lab.command("status")
def status() -> None:
    """A table of nodes: address, booted (systemctl is-system-running), sshd, docker, what runs there."""
    from rich.console import Console
    from rich.table import Table

    from mesh.lab.status import lab_status

    table = Table("node", "address", "booted", "sshd", "docker", "runs")
    for row in lab_status(_lab()):
        table.add_row(row.name, row.address, row.booted, row.sshd, row.docker, row.runs)
    Console().print(table)


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("host")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(host: str, command: tuple[str, ...]) -> None:
    """Run COMMAND on HOST over SSH (the lab's key, strict host key checking); stdin and the exit code pass
    through. Example: mesh lab exec vm1 -- systemctl is-system-running"""
    words = list(command)
    if words and words[0] == "--":  # click keeps the separator when it comes after HOST
        words = words[1:]
    code = _lab().exec(host, words)
    raise click.exceptions.Exit(code)
