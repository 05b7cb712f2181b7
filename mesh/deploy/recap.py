"""The PLAY RECAP block exactly as ansible-playbook prints it, and a run's exit code by INVENTORY.md.
It owns those two formats of a result; it must not run anything.
"""

from __future__ import annotations

from mesh.deploy.display import banner
from mesh.deploy.results import HostStats, PlayResult
from mesh.errors import EXIT_HOST_FAILED, EXIT_OK, EXIT_UNREACHABLE


def _count(name: str, value: int) -> str:
    return f"{name}={value:<4}"


def recap_line(host: str, stats: HostStats) -> str:
    """`vm1                        : ok=3    changed=1    unreachable=0    failed=0    skipped=0 ...`"""
    counts = [("ok", stats.ok), ("changed", stats.changed), ("unreachable", stats.unreachable),
              ("failed", stats.failed), ("skipped", stats.skipped), ("rescued", stats.rescued),
              ("ignored", stats.ignored)]
    return f"{host:<26} : " + " ".join(_count(name, value) for name, value in counts)


def format_recap(result: PlayResult) -> str:
    """The recap block: a blank line, the banner, one line per host sorted by name, a blank line; when a
    rollout stopped, a last line says where and which hosts it left untouched."""
    lines = ["", banner("PLAY RECAP")]
    lines += [recap_line(host, result.stats[host]) for host in sorted(result.stats)]
    if result.stopped is not None:
        lines += ["", f"STOPPED: {result.stopped.describe()}"]
    return "\n".join(lines) + "\n\n"


def exit_code(result: PlayResult) -> int:
    """3 when a host was unreachable, else 2 when a host failed, else 0 (the highest applicable wins)."""
    if result.unreachable_hosts:
        return EXIT_UNREACHABLE
    if result.failed_hosts:
        return EXIT_HOST_FAILED
    return EXIT_OK
