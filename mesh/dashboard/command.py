"""`mesh dashboard [-i INV] [--port LOCAL] [--no-browser]`: the active controller's dashboard in a browser.

It finds the controller holding the controllers' Consul lock, forwards 127.0.0.1:LOCAL on this machine to that
controller's 127.0.0.1:<web port> (each connection a `direct-tcpip` channel of mesh's own SSH connection to it,
host key checked as every mesh command does), prints the URL, opens the browser, and runs until SIGINT or
SIGTERM (exit 0). No controller holds the lock, or none answers: a clear error and mesh's exit codes (1; 3 when
the controller's host cannot be reached; 5 for a local port that cannot be listened on).

It owns choosing the controller and the forward; what the page shows is the controller's (server.py).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import webbrowser
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import click

from mesh.cli_inventory import fleet_inventory, inventory_option
from mesh.controller.spec import DEFAULT_WEB_PORT, lock_key
from mesh.errors import EXIT_OK, MeshError, UsageError
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost, Mesh

LISTEN_ADDRESS = "127.0.0.1"
PROBE_TIMEOUT = 10.0
BUFFER = 64 * 1024


class Channel(Protocol):
    """A byte stream to the controller's web port: an SSH channel (paramiko.Channel) or a socket."""

    def sendall(self, data: bytes) -> Any: ...

    def recv(self, size: int) -> bytes: ...

    def settimeout(self, timeout: float | None) -> None: ...

    def close(self) -> None: ...


OpenChannel = Callable[[], Channel]


# ---- which controller ---------------------------------------------------------------------------------------

def lock_holder(value: bytes | str | None, session: str | None) -> str | None:
    """The host part of the lock's holder (`{"holder": "ctl1:1234"}`) while a session holds it; else None."""
    if not session:
        return None
    try:
        holder = json.loads(value or b"")["holder"]
    except (ValueError, KeyError, TypeError):
        return None
    return str(holder).rsplit(":", 1)[0] if isinstance(holder, str) and holder else None


def read_holder(mesh: Mesh) -> str | None:
    """The host holding the controllers' lock, from Consul (None: nobody holds it)."""
    from mesh import catalog

    with catalog.client_for(catalog.access_for(mesh)) as client:
        _, entry = client.kv.get(lock_key(mesh.settings.id))
    entry = entry or {}
    return lock_holder(entry.get("Value"), entry.get("Session"))


def active_controller(controllers: Iterable[ManagedHost], holder: str | None) -> ManagedHost:
    """The inventory's controller that holds the lock (by host name; `ctl1.example.com` is `ctl1` too)."""
    listed = list(controllers)
    if not listed:
        raise MeshError("the inventory has no mesh_controllers: no controller serves a dashboard",
                        "add hosts to the mesh_controllers group and run mesh deploy")
    if holder is None:
        raise MeshError("no controller holds the controllers' lock, so none is active",
                        "`mesh status` says why; `mesh deploy` starts the controllers")
    short = holder.split(".", 1)[0]
    for host in listed:
        if host.name in (holder, short) or host.name.split(".", 1)[0] == short:
            return host
    names = ", ".join(host.name for host in listed)
    raise MeshError(f"the active controller runs on {holder!r}, which is none of the inventory's mesh_controllers "
                    f"({names})", "is this the inventory the controllers were deployed from?")


def channel_opener(host: ManagedHost, port: int, connector: Any | None = None) -> OpenChannel:
    """Channels to host's 127.0.0.1:port: through SSH (mesh.hosts' connector), or a plain socket when the
    controller is this machine (`ansible_connection: local`)."""
    if host.connection.local:
        return lambda: socket.create_connection((LISTEN_ADDRESS, port), timeout=PROBE_TIMEOUT)
    if connector is None:
        from mesh.hosts.ssh import SSHConnector

        connector = SSHConnector(host.connection, name=host.name)
    tunnels = connector
    return lambda: tunnels.open_tunnel(LISTEN_ADDRESS, port)


def probe(open_channel: OpenChannel, where: str, port: int) -> dict[str, Any]:
    """GET /api/controller through one channel: who answers there. MeshError when nothing does."""
    try:
        channel = open_channel()
    except HostUnreachable:
        raise
    except OSError as exc:
        raise MeshError(f"{where} answers SSH, but nothing listens on its {LISTEN_ADDRESS}:{port} ({exc})",
                        "is its controller running, and deployed by this mesh version? `mesh status`, "
                        "`mesh deploy`") from None
    try:
        channel.settimeout(PROBE_TIMEOUT)
        channel.sendall(f"GET /api/controller HTTP/1.0\r\nHost: {LISTEN_ADDRESS}:{port}\r\n\r\n".encode())
        parts = []
        while True:
            part = channel.recv(BUFFER)
            if not part:
                break
            parts.append(part)
    except OSError as exc:
        raise MeshError(f"{where}: the dashboard at {LISTEN_ADDRESS}:{port} did not answer: {exc}") from None
    finally:
        channel.close()
    head, _, body = b"".join(parts).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    try:
        found = json.loads(body) if status.split(" ")[1:2] == ["200"] else None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise MeshError(f"{where}: {LISTEN_ADDRESS}:{port} is not mesh's dashboard (it answered {status!r})")
    return found


# ---- the forward --------------------------------------------------------------------------------------------

class Forwarder:
    """Listens on 127.0.0.1:port (0: a free one) and carries each connection over a channel of its own, both
    ways, until either side closes. A channel that cannot be opened closes that connection (and is reported
    through `warn`, once until one opens again)."""

    def __init__(self, open_channel: OpenChannel, port: int = 0, warn: Callable[[str], None] | None = None) -> None:
        self.open_channel = open_channel
        self.warn = warn or (lambda message: click.echo(f"[WARNING]: {message}", err=True))
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((LISTEN_ADDRESS, port))
        except OSError as exc:
            self.listener.close()
            raise UsageError(f"--port {port}: cannot listen on {LISTEN_ADDRESS}:{port}: {exc.strerror or exc}",
                             "give another port, or none for a free one") from None
        self.listener.listen(32)
        self.closed = threading.Event()
        self.failing = False
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, name="dashboard-forward", daemon=True)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def start(self) -> Forwarder:
        self.thread.start()
        return self

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                local, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._carry, args=(local,), name="dashboard-connection", daemon=True).start()

    def _carry(self, local: socket.socket) -> None:
        try:
            remote = self.open_channel()
        except (OSError, MeshError) as exc:
            if not self.failing:
                self.warn(f"cannot reach the dashboard: {exc}; retrying with the next request")
            self.failing = True
            local.close()
            return
        self.failing = False
        self.connections += 1
        remote.settimeout(None)
        done = threading.Event()

        def pump(read: Callable[[int], bytes], write: Callable[[bytes], Any]) -> None:
            try:
                while not done.is_set():
                    data = read(BUFFER)
                    if not data:
                        break
                    write(data)
            except (OSError, EOFError):
                pass
            finally:
                done.set()
                for end in (local, remote):
                    try:
                        end.close()
                    except OSError:
                        pass

        back = threading.Thread(target=pump, args=(remote.recv, local.sendall), daemon=True)
        back.start()
        pump(local.recv, remote.sendall)
        back.join(timeout=5)

    def close(self) -> None:
        self.closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


# ---- the command --------------------------------------------------------------------------------------------

def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM (the handlers are put back afterwards)."""
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    before = {number: signal.getsignal(number) for number in signals}
    for number in signals:
        signal.signal(number, lambda _number, _frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def run_dashboard(mesh: Mesh, port: int = 0, browser: bool = True, *,
                  holder: Callable[[Mesh], str | None] = read_holder,
                  opener: Callable[[ManagedHost, int], OpenChannel] = channel_opener,
                  web_port: int = DEFAULT_WEB_PORT, echo: Callable[[str], None] = click.echo,
                  open_browser: Callable[[str], Any] = webbrowser.open,
                  wait: Callable[[], None] = wait_for_signal) -> int:
    """Forward to the active controller's dashboard until `wait` returns; exit 0."""
    controller = active_controller(mesh.controllers, holder(mesh))
    open_channel = opener(controller, web_port)
    probe(open_channel, controller.name, web_port)  # a dashboard answers there before the URL is given
    forwarder = Forwarder(open_channel, port).start()
    try:
        url = f"http://{LISTEN_ADDRESS}:{forwarder.port}/"
        echo(f"dashboard: {url} (through {controller.name}; Ctrl-C to close)")
        if browser:
            open_browser(url)
        wait()
    finally:
        forwarder.close()
    return EXIT_OK


@click.command("dashboard")
@inventory_option
@click.option("--port", default=0, type=click.IntRange(0, 65535), metavar="LOCAL",
              help="The local port to listen on (127.0.0.1); default: a free one.")
@click.option("--no-browser", is_flag=True, help="Print the URL only; open no browser.")
@click.pass_context
def dashboard_command(ctx: click.Context, inventory_option: str | None, port: int, no_browser: bool) -> None:
    """Open the active controller's dashboard: the live service graph (request rate, error rate, p99 per call),
    every instance's health, version, kind, host, certificate expiry, drain and sync state, traffic splits and
    authorization denials. Forwards a local port to the controller's loopback through SSH and runs until
    Ctrl-C. Exit 1 when no controller is active or none answers, 3 when its host cannot be reached."""
    from mesh.inventory.check import check_inventory
    from mesh.inventory.loader import load_inventory

    path = fleet_inventory(None, inventory_option)
    mesh = check_inventory(load_inventory(path), path).mesh
    code = run_dashboard(mesh, port, browser=not no_browser)
    click.echo("dashboard closed", err=True)
    ctx.exit(code)
