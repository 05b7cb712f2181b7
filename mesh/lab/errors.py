"""Errors of the lab that a user can fix, and the one helper that runs host commands with clear failures.
Nothing here creates lab resources; it only runs what it is given and explains what went wrong.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence

from mesh.errors import EXIT_USAGE, MeshError

# The Debian package that ships each command the lab runs on the host.
PACKAGES = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "mount": "mount",
    "umount": "mount",
    "nft": "nftables",
}


class LabError(MeshError):
    """The lab cannot do what was asked; the message says why and what to do."""


class UnknownNodeError(LabError):
    """A node name the lab does not have (exit 5, a usage error)."""

    exit_code = EXIT_USAGE


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        packages = sorted({PACKAGES.get(name, name) for name in missing})
        raise LabError(f"missing command(s): {', '.join(missing)}",
                       hint=f"install the Debian package(s): apt-get install {' '.join(packages)}")


def run(argv: Sequence[str], *, check: bool = True, input: str | None = None,
        env: Mapping[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a host command; on failure raise LabError naming the command and its stderr."""
    try:
        result = subprocess.run(list(argv), check=False, input=input, capture_output=True, text=True,
                                timeout=timeout, env=dict(env) if env is not None else None)
    except FileNotFoundError as exc:
        require_tools(argv[0])
        raise LabError(f"cannot run {argv[0]}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s") from exc
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        tail = detail[-1] if detail else f"exit status {result.returncode}"
        if "No space left on device" in (result.stderr or ""):
            raise LabError(f"`{' '.join(argv)}`: the disk is full", hint="free some space and run it again")
        raise LabError(f"`{' '.join(argv)}` failed: {tail}")
    return result
