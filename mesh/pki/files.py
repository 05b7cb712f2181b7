"""The CA's files on disk: atomic writes with their final mode from the first byte, and mode checks on read.

It owns how bytes reach `<state_dir>/ca/`; it must not know what a certificate or a key is.
"""

from __future__ import annotations

import os
import stat
import uuid

from mesh.errors import MeshError

PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644
PRIVATE_DIR = 0o700


def write_atomic(path: str, data: bytes, mode: int) -> None:
    """Write data to path through a temp file in the same folder, created with mode (umask only narrows it,
    so a key is never readable by others even for an instant), then renamed over path."""
    temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    sync_dir(os.path.dirname(path))


def sync_dir(path: str) -> None:
    """Make a rename in path durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: str, what: str) -> bytes:
    """The bytes of one of the CA's files; a clear MeshError when it is missing or unreadable."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise MeshError(f"the mesh CA is incomplete: {what} {path} is missing",
                        "restore it from a backup, or move the ca folder away and run `mesh ca init`") from None
    except OSError as exc:
        raise MeshError(f"cannot read {what} {path}: {exc.strerror}") from None


def require_private(path: str, what: str) -> None:
    """Refuse a key or folder that group or others may read: it was copied or changed by hand."""
    try:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
    except FileNotFoundError:
        raise MeshError(f"the mesh CA is incomplete: {what} {path} is missing",
                        "restore it from a backup, or move the ca folder away and run `mesh ca init`") from None
    if mode & 0o077:
        expected = PRIVATE_DIR if os.path.isdir(path) else PRIVATE_FILE
        raise MeshError(f"{what} {path} has mode {mode:04o}: group or others may read it",
                        f"check who could have copied it, then `chmod {expected:o} {path}`")
