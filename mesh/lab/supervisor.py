"""The small process that keeps one lab node running: it starts systemd-nspawn again when the node reboots
(exit status 133, same writable layer) and ends when the node powers off or when it is told to stop (SIGTERM).

Started detached by `mesh lab up` as `python -m mesh.lab.supervisor SPEC`; it must not import the rest of mesh,
so that it keeps running whatever happens to the checkout it was started from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REBOOT_STATUS = 133
RESTART_LIMIT = 20  # reboots within RESTART_WINDOW seconds before the supervisor gives up (a boot loop)
RESTART_WINDOW = 60.0


def _say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} supervisor[{os.getpid()}]: {message}", flush=True)


def enter_own_cgroup(name: str, root: Path = Path("/sys/fs/cgroup")) -> None:
    """Move this process into a cgroup of its own, so that nspawn makes the node's `payload` and `supervisor`
    cgroups under it: on a host whose PID 1 is not systemd, nspawn would otherwise put every node's systemd in
    one shared /payload, where each would manage (and stop) the others' units."""
    candidates = [root / "systemd", root / "unified"]
    if (root / "cgroup.controllers").exists():  # a pure cgroup v2 host
        candidates = [root]
    for hierarchy in candidates:
        if not (hierarchy / "cgroup.procs").exists():
            continue
        own = hierarchy / name
        own.mkdir(exist_ok=True)
        (own / "cgroup.procs").write_text(f"{os.getpid()}\n")


def supervise(argv: list[str], env: dict[str, str], pidfile: Path) -> int:
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        # nspawn turns SIGTERM into an orderly shutdown of the container (SIGRTMIN+3 to its init)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts: list[float] = []
    status = 0
    while not stopping:
        child = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL)
        pidfile.write_text(f"{child.pid}\n")
        _say(f"started nspawn pid {child.pid}")
        status = child.wait()
        _say(f"nspawn exited with status {status}")
        if status != REBOOT_STATUS:
            break
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
        if len(restarts) > RESTART_LIMIT:
            _say("too many reboots in a row: giving up")
            break
    pidfile.unlink(missing_ok=True)
    return status


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    enter_own_cgroup(str(spec["cgroup"]))
    return supervise(list(spec["argv"]), dict(spec.get("env", {})), Path(spec["pidfile"]))


if __name__ == "__main__":
    sys.exit(main())
