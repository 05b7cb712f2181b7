"""How long mesh waits on a host, and the keepalive that tells a host gone silent (a partition, a host that
froze) from a slow command. It owns those numbers and the watch over one SSH connection; it must not run
commands.

The bound: a host that stops answering is reported unreachable at most `unreachable_after` seconds after the
last packet it sent (keepalive_interval x (keepalive_count_max + 1), 20 s by default), whatever it was doing;
one that cannot be reached at all fails after `connect` seconds (TCP connect, SSH banner and authentication
each). A command that runs longer than `command` seconds on a host that still answers fails (exit 124).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # paramiko is imported by ssh.py, when a host is first reached
    import paramiko

KEEPALIVE_REQUEST = "keepalive@openssh.com"  # what OpenSSH's ServerAliveInterval sends; sshd answers it


@dataclass(frozen=True)
class Timeouts:
    """Ansible's `timeout` (connect) and OpenSSH's ServerAliveInterval/ServerAliveCountMax, plus a limit on
    one remote command that fits the slowest one mesh sends (Envoy's 107 MB binary over a slow link, a
    sidecar image imported by Docker, the checker's wheels installed)."""

    connect: float = 10.0
    command: float = 900.0
    keepalive_interval: float = 5.0
    keepalive_count_max: int = 3

    @property
    def unreachable_after(self) -> float:
        """Seconds of silence after which a connected host is unreachable."""
        return self.keepalive_interval * (self.keepalive_count_max + 1)


DEFAULT_TIMEOUTS = Timeouts()


class Keepalive:
    """Watches one SSH transport on a thread: when nothing came from the host for keepalive_interval it asks
    the host for an answer (keepalive@openssh.com); silent for unreachable_after, the transport is closed,
    which wakes every command waiting on it, and `silent_for` says why."""

    def __init__(self, transport: paramiko.Transport, timeouts: Timeouts) -> None:
        self._transport = transport
        self._timeouts = timeouts
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._probe: threading.Thread | None = None
        self.silent_for: float | None = None  # set when the host was given up on
        self._thread = threading.Thread(target=self._watch, name="mesh-ssh-keepalive", daemon=True)
        self._thread.start()

    def heard(self) -> None:
        """Something came from the host (output, window space for what is sent): it is alive."""
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        interval = min(self._timeouts.keepalive_interval, 1.0)
        while not self._stop.wait(interval):
            if not self._transport.is_active():
                return
            silent = time.monotonic() - self._last
            if silent >= self._timeouts.unreachable_after:
                self.silent_for = silent
                self._transport.close()
                return
            if silent >= self._timeouts.keepalive_interval and (self._probe is None or not self._probe.is_alive()):
                self._probe = threading.Thread(target=self._ask, name="mesh-ssh-probe", daemon=True)
                self._probe.start()

    def _ask(self) -> None:
        try:
            # sshd answers a request it does not know with a failure: any answer proves the host is there
            self._transport.global_request(KEEPALIVE_REQUEST, wait=True)
        except Exception:  # noqa: BLE001 - a probe that fails is a probe not answered
            return
        if self._transport.is_active() and not self._stop.is_set():
            self.heard()
