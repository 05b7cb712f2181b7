"""The deploy lock: one in mesh_state_dir (a file held with flock) and one in Consul per mesh_id (a session
with a TTL holding `mesh/<mesh_id>/deploy/lock`), so a second deploy is refused (exit 1) naming the holder.
It owns taking, keeping and giving back both locks; it must not deploy anything.

Neither lock outlives its process for long: the kernel drops a flock when its process dies, and Consul
invalidates a session that is not renewed within its TTL (Consul allows itself up to twice the TTL).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import consul

from mesh import catalog
from mesh.errors import EXIT_ERROR, MeshError
from mesh.inventory.model import Mesh

LOCK_FILE = "deploy.lock"  # in mesh_state_dir
SESSION_NAME = "mesh-deploy"
SESSION_TTL = 30  # seconds; renewed every third of it
CONSUL_TIMEOUT = 5.0

Warn = Callable[[str], None]


def consul_key(mesh_id: str) -> str:
    return f"mesh/{mesh_id}/deploy/lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: written into it, and named to whoever is refused."""

    user: str
    host: str
    pid: int
    started: str  # UTC, ISO 8601 to the second
    command: str

    @classmethod
    def me(cls, command: str | None = None) -> Holder:
        return cls(_user(), socket.gethostname(), os.getpid(),
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   command if command is not None else " ".join(["mesh", *sys.argv[1:]]))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Holder | None:
        try:
            data = json.loads(text or "")
            return cls(str(data["user"]), str(data["host"]), int(data["pid"]), str(data["started"]),
                       str(data["command"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"{self.user}@{self.host}, pid {self.pid}, since {self.started} ({self.command})"


class DeployLocked(MeshError):
    """Another deploy holds a lock (exit 1); the message names it and its holder."""

    exit_code = EXIT_ERROR


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


# ---- the lock in the state dir ------------------------------------------------------------------------------


class LocalLock:
    """`<state_dir>/deploy.lock`, held with flock while the deploy runs; its content names the holder.

    The file is removed on release (while still locked), and so is the state dir when the lock made it and it
    is still empty: a deploy refused early leaves nothing behind.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_FILE
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self, holder: Holder, warn: Warn) -> None:
        if not self.state_dir.exists():
            self.state_dir.mkdir(parents=True, mode=0o700)
            self._made_dir = True
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    raise DeployLocked(self._refusal(), hint="wait for it to finish; the lock goes with its "
                                       "process") from None
                if _same_file(fd, self.path):
                    break
                os.close(fd)  # the holder removed the file between our open and flock: take the new one
            stale = Holder.from_json(os.read(fd, 4096))
            if stale is not None:
                warn(f"the previous deploy ({stale.describe()}) ended without releasing {self.path}; "
                     "taking it over")
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder.to_json() + "\n").encode(), 0)
            self._fd = fd
        except BaseException:
            self._remove_dir()
            raise

    def _refusal(self) -> str:
        for _ in range(20):  # the holder writes its name just after taking the lock
            try:
                holder = Holder.from_json(self.path.read_text())
            except OSError:
                holder = None
            if holder is not None:
                return f"another deploy holds the deploy lock {self.path}: {holder.describe()}"
            time.sleep(0.05)
        return f"another deploy holds the deploy lock {self.path} (its holder is not written in it)"

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.state_dir.rmdir()  # only when empty
            self._made_dir = False


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


# ---- the lock in Consul -----------------------------------------------------------------------------------------


class ConsulLock:
    """`mesh/<mesh_id>/deploy/lock` acquired with a session of SESSION_TTL seconds, renewed on a thread."""

    def __init__(self, access: catalog.ConsulAccess, mesh_id: str, ttl: int = SESSION_TTL) -> None:
        self.access = access
        self.key = consul_key(mesh_id)
        self.ttl = ttl
        self.client = catalog.connect(access, timeout=CONSUL_TIMEOUT)
        self.session: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self, holder: Holder, warn: Warn) -> None:
        try:
            with catalog.consul_errors(self.access):
                catalog.check_token(self.client, self.access)
                try:
                    self.session = self.client.session.create(name=SESSION_NAME, ttl=self.ttl, lock_delay=0,
                                                              behavior="delete", checks=[])
                    acquired = self.client.kv.put(self.key, holder.to_json(), acquire=self.session)
                except consul.ACLPermissionDenied as exc:
                    raise MeshError(f"Consul at {self.access.url} refused the deploy lock {self.key}: "
                                    f"{catalog_first_line(exc)}",
                                    hint='the token\'s policy needs session_prefix "" write and key_prefix "mesh/" '
                                         "write (see the README)") from None
                if not acquired:
                    raise DeployLocked(self._refusal(), hint="wait for it to finish; a deploy that died frees "
                                       f"it within {2 * self.ttl} s (its session's TTL)")
        except BaseException:
            self._end_session(warn)
            raise
        self._renewer = threading.Thread(target=self._renew, args=(warn,), name="mesh-deploy-lock", daemon=True)
        self._renewer.start()

    def _refusal(self) -> str:
        where = f"the Consul lock {self.key} at {self.access.url}"
        _, entry = self.client.kv.get(self.key)
        holder = Holder.from_json((entry or {}).get("Value"))
        if holder is None:
            return f"another deploy holds {where}"
        return f"another deploy holds {where}: {holder.describe()}"

    def _renew(self, warn: Warn) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.client.session.renew(self.session)
            except consul.NotFound:
                warn(f"the Consul deploy lock {self.key} was lost (its session expired); another deploy may start")
                return
            except (consul.ConsulException, OSError) as exc:
                warn(f"cannot renew the Consul deploy lock {self.key}: {catalog_first_line(exc)}")

    def release(self, warn: Warn) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=CONSUL_TIMEOUT)
        self._end_session(warn)

    def _end_session(self, warn: Warn) -> None:
        try:
            if self.session is not None:  # behavior=delete: ending the session removes the key it holds
                self.client.session.destroy(self.session)
        except (consul.ConsulException, OSError) as exc:
            warn(f"cannot release the Consul deploy lock {self.key} ({catalog_first_line(exc)}); it expires "
                 f"within {2 * self.ttl} s")
        finally:
            self.session = None
            self.client.http.close()


def catalog_first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- both -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deploy_lock(mesh: Mesh, warn: Warn, command: str | None = None) -> Iterator[Holder]:
    """Hold the state dir's lock, then Consul's (when mesh_consul_url is set), for the body; both released
    after it, also on errors and Ctrl-C. Raises DeployLocked (exit 1) when another deploy holds either.

    Consul unreachable does not stop the deploy (it warns: only the local lock holds then); a token Consul
    refuses, or one whose policy may not take the lock, does (exit 1)."""
    holder = Holder.me(command)
    local = LocalLock(mesh.settings.state_dir)
    local.acquire(holder, warn)
    remote: ConsulLock | None = None
    try:
        remote = _consul_lock(mesh, holder, warn)
        yield holder
    finally:
        if remote is not None:
            remote.release(warn)
        local.release()


def _consul_lock(mesh: Mesh, holder: Holder, warn: Warn) -> ConsulLock | None:
    if not mesh.settings.consul_url:
        return None
    try:
        lock = ConsulLock(catalog.access_for(mesh), mesh.settings.id)
        lock.acquire(holder, warn)
    except catalog.TokenRefused:
        raise
    except catalog.CatalogError as exc:  # unreachable, or an error of Consul's own
        warn(f"the Consul deploy lock was not taken ({exc}); only the lock in the state dir holds")
        return None
    return lock
