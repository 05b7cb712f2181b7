"""A real `consul agent -dev` on 127.0.0.1 with free ports, for tests: the real part, not a fake.

It starts and stops one agent process (by its PID) and waits until it serves; it must not fetch Consul.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

PORT_NAMES = ("http", "dns", "serf-lan", "serf-wan", "server", "grpc")


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on right now (TCP and UDP both free), distinct from each other."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        if port not in ports:
            ports.append(port)
    return ports


class ConsulDevServer:
    """One `consul agent -dev` bound to 127.0.0.1; use as a context manager or call start()/stop().

    >>> with ConsulDevServer(binary) as server:
    ...     catalog.sync(server.url, mesh)
    """

    def __init__(self, binary: Path, node: str = "consul-dev", start_timeout: float = 30.0) -> None:
        self.binary = binary
        self.node = node
        self.start_timeout = start_timeout
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def start(self) -> Self:
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        argv = [str(self.binary), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
                "-node", self.node, "-log-level", "warn"]
        argv += [f"-{name}-port={port}" for name, port in self.ports.items()]
        self._log = tempfile.NamedTemporaryFile(prefix="consul-dev-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"consul agent -dev exited with {code}: {self.log_text()}")
            if self._serving():
                return
            time.sleep(0.1)
        raise RuntimeError(f"consul agent -dev did not serve within {self.start_timeout}s: {self.log_text()}")

    def _serving(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/status/leader", timeout=1) as answer:
                leader = json.loads(answer.read())
            with urllib.request.urlopen(f"{self.url}/v1/catalog/node/{self.node}", timeout=1) as answer:
                node = json.loads(answer.read())
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return bool(leader) and bool(node)

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-2000:] if self._log else ""

    def stop(self) -> None:
        """Stop the agent by its PID (SIGTERM, then SIGKILL after 10 s) and drop its log."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
