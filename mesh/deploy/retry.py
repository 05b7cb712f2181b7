"""The retry file of a deploy, in Ansible's format (one host name per line), and reading `@FILE` in --limit.
It owns the file's format and where the hosts of a run go; it must not run or match hosts.

After a run, the file names every host that still needs the deploy: hosts that failed, were unreachable, or
were not reached because a rollout stopped, plus the hosts it named before that this run did not converge.
A host that finished without failing is taken out; the file is removed when no host is left.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from mesh.errors import UsageError

RETRY_FILE = "deploy.retry"  # in mesh_state_dir


def retry_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / RETRY_FILE


def read_hosts(path: str | Path) -> list[str]:
    """The names a limit file lists (blank lines and surrounding spaces dropped), as Ansible reads it."""
    file = Path(path)
    if not file.exists():
        raise UsageError(f"--limit @{path}: unable to find the limit file {path}",
                         "a deploy writes the retry file only after a run with failed or unreachable hosts")
    if not file.is_file():
        raise UsageError(f"--limit @{path}: a limit starting with @ must be the path of a file")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def update(path: str | Path, need_retry: Sequence[str], converged: Iterable[str]) -> list[str]:
    """Write the hosts that still need a deploy (need_retry first, then earlier ones not converged now);
    remove the file when there is none. Returns the hosts written."""
    file = Path(path)
    earlier = read_hosts(file) if file.is_file() else []
    done = set(converged) - set(need_retry)
    hosts = list(dict.fromkeys([*need_retry, *(host for host in earlier if host not in done)]))
    if not hosts:
        file.unlink(missing_ok=True)
        return []
    temp = file.with_name(f".{file.name}.tmp")
    temp.write_text("".join(f"{host}\n" for host in hosts), encoding="utf-8")
    os.replace(temp, file)
    return hosts
