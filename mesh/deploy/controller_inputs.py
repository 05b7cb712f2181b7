"""What the controllers' part of a plan needs, read before the plan (mesh.plan.build.ControllerInputs): each
controller's SSH public key, the known_hosts lines the deploy checks every host with, the controllers' intermediate,
the mesh-ctl script, and whether a controller is running (it then owns the endpoint files).

Where the controllers' keys come from: each key is made ON its controller (`ssh-keygen`, the private half never
leaves it) by the deploy itself here, before the plan, and only its .pub is read back; so the plan already holds
every managed host's authorized_keys, and observe, `mesh plan` and cleanup treat it as any planned file. `mesh plan`
and check mode only read: a controller without a key yet is left out of authorized_keys (the deploy makes it).
This is the only change a deploy makes before its plan; `mesh controller rotate-keys` removes the keys and deploys.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

from mesh import catalog
from mesh.controller import spec as controller_spec
from mesh.errors import MeshError
from mesh.hosts.connection import Connector
from mesh.hosts.known_hosts import host_matches
from mesh.inventory.model import ManagedHost, Mesh
from mesh.pki import CertificateAuthority
from mesh.plan import access
from mesh.plan.build import ControllerInputs

Warn = Callable[[str], None]
ACTIVE_WITHIN_S = 60.0  # a controller whose state is older than this is not answering
KEYS_RECORD = "controller-keys.json"  # in mesh_state_dir: the public keys last read, for a controller unreachable now
CONTROLLER_COMMENT = "mesh controller"
PUBLIC_KEY = f"{controller_spec.SSH_KEY}.pub"


def read_key_command() -> str:
    return f"cat {shlex.quote(PUBLIC_KEY)} 2>/dev/null || true"


def make_key_command(host: str) -> str:
    """Creates the controller's user and folder when missing, then its key once (ssh-keygen on the host), and
    prints the public key. Idempotent: an existing key is kept."""
    q = shlex.quote
    user, folder, key = controller_spec.CONTROLLER_USER, controller_spec.CONTROLLER_DIR, controller_spec.SSH_KEY
    return "; ".join([
        "set -e", "PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin",
        (f"getent passwd {user} >/dev/null || useradd --system --user-group --no-create-home --home-dir {q(folder)} "
        f"--shell /usr/sbin/nologin --comment {q(CONTROLLER_COMMENT)} {user}"),
        f"mkdir -p {q(folder)}", f"chown root:{user} {q(folder)}", f"chmod 0750 {q(folder)}",
        (f"if [ ! -s {q(key)} ] || [ ! -s {q(key)}.pub ]; then rm -f {q(key)} {q(key)}.pub; "
        f"ssh-keygen -q -t ed25519 -N '' -f {q(key)} -C {q('mesh-controller@' + host)} >/dev/null; fi"),
        f"chown {user}:{user} {q(key)} {q(key)}.pub", f"chmod 0600 {q(key)}", f"chmod 0644 {q(key)}.pub",
        f"cat {q(key)}.pub"])


def remove_key_command() -> str:
    """`mesh controller rotate-keys`: the next deploy makes a new key."""
    key = shlex.quote(controller_spec.SSH_KEY)
    return f"rm -f {key} {key}.pub"


def remove_controller_keys(controllers: Sequence[ManagedHost], connect: Callable[[ManagedHost], Connector],
                           warn: Warn) -> list[str]:
    """`mesh controller rotate-keys`: each controller's SSH key removed, so the deploy that follows makes a new
    one and replaces every host's authorized_keys; the names of the controllers whose key went."""
    removed = []
    for host in controllers:
        try:
            connector = connect(host)
        except MeshError as exc:
            warn(f"controller {host.name} cannot be reached: its key is not rotated ({exc})")
            continue
        try:
            result = connector.run(remove_key_command())
        finally:
            connector.close()
        if result.ok:
            removed.append(host.name)
        else:
            warn(f"controller {host.name}: its key could not be removed ({result.error_text()[:300]})")
    return removed


def controller_keys(controllers: Sequence[ManagedHost], connect: Callable[[ManagedHost], Connector],
                    create_on: Collection[str], warn: Warn, forks: int = 20) -> dict[str, str]:
    """Each controller's `TYPE BASE64`, made first on the controllers named in `create_on` (the deploy's targets);
    a controller that cannot be reached, or has no key yet where none is made, is left out (with a warning)."""
    def one(host: ManagedHost) -> tuple[str, str | None]:
        create = host.name in create_on
        try:
            connector = connect(host)
        except MeshError as exc:
            warn(f"controller {host.name} cannot be reached for its SSH key ({exc})")
            return host.name, None
        try:
            result = connector.run(make_key_command(host.name) if create else read_key_command())
        finally:
            connector.close()
        text = result.text().strip()
        if not result.ok or not text:
            if create:
                warn(f"controller {host.name}: its SSH key could not be made ({result.error_text()[:300]})")
            return host.name, None
        return host.name, access.public_key(text.splitlines()[-1], host.name)
    if not controllers:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(controllers))),
                            thread_name_prefix="mesh-ctl-keys") as pool:
        found = dict(pool.map(one, controllers))
    return {name: key for name, key in found.items() if key is not None}


def recorded_keys(state_dir: str) -> dict[str, str]:
    """The controllers' public keys a deploy last read (`<state_dir>/controller-keys.json`), {} when none."""
    try:
        with open(os.path.join(state_dir, KEYS_RECORD), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return {str(host): str(key) for host, key in data.items()} if isinstance(data, dict) else {}


def record_keys(state_dir: str, keys: dict[str, str]) -> None:
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, KEYS_RECORD)
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(keys, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(temp, path)


def with_recorded(read: dict[str, str], recorded: dict[str, str], controllers: Sequence[str],
                  warn: Warn) -> dict[str, str]:
    """The keys read now, and for a controller that gave none the key recorded by the last deploy (a controller
    down during a deploy keeps its access); a controller with neither is left out of every authorized_keys."""
    keys = {}
    for name in controllers:
        if name in read:
            keys[name] = read[name]
        elif name in recorded and _valid_key(recorded[name], name):
            warn(f"controller {name}: its SSH key as the last deploy read it is kept in every authorized_keys")
            keys[name] = recorded[name]
        else:
            warn(f"controller {name} has no known SSH key: it is left out of every host's authorized_keys "
                 "(the next deploy that reaches it makes one)")
    return keys


def _valid_key(key: str, controller: str) -> bool:
    """A recorded key goes into authorized_keys only as access.public_key would take it (the record is a file)."""
    try:
        return access.public_key(key, controller) == key
    except MeshError:
        return False


def known_hosts_lines(host: ManagedHost) -> tuple[str, ...]:
    """The lines of the host's known_hosts file (as the deploy reads it) that name this host's address and port:
    its trusted keys and the `@revoked` lines (`@cert-authority` lines are refused by mesh and left out)."""
    connection = host.connection
    path = os.path.expanduser(connection.known_hosts)
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return ()
    found = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        marker = ""
        rest = line
        if line.startswith("@"):
            marker, _, rest = line.partition(" ")
            if marker != "@revoked":
                continue
        patterns = tuple(rest.split(None, 1)[0].split(",")) if rest.strip() else ()
        if patterns and host_matches(patterns, connection.address, connection.port):
            found.append(line)
    return tuple(found)


def controller_active(mesh: Mesh, warn: Warn, now: float | None = None) -> bool:
    """Whether a controller answers: its Consul lock has a session and its state was published recently."""
    if not mesh.settings.consul_url or not mesh.controllers:
        return False
    try:
        with catalog.client_for(catalog.access_for(mesh)) as client:
            _, lock = client.kv.get(controller_spec.lock_key(mesh.settings.id))
            if not lock or not lock.get("Session"):
                return False
            _, state = client.kv.get(controller_spec.state_key(mesh.settings.id))
    except MeshError as exc:
        warn(f"cannot ask Consul whether a controller runs ({exc})")
        return False
    updated = state_updated_at((state or {}).get("Value"))
    return updated is not None and abs((now if now is not None else time.time()) - updated) <= ACTIVE_WITHIN_S


def read_state(mesh: Mesh) -> dict[str, object] | None:
    """The active controller's published state (JSON), or None."""
    with catalog.client_for(catalog.access_for(mesh)) as client:
        _, entry = client.kv.get(controller_spec.state_key(mesh.settings.id))
    try:
        data = json.loads((entry or {}).get("Value") or b"")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def state_updated_at(value: bytes | str | None) -> float | None:
    """`updated_at` of a state document: epoch seconds, or an ISO 8601 time."""
    try:
        data = json.loads(value or b"")
        updated = data["updated_at"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(updated, (int, float)):
        return float(updated)
    if isinstance(updated, str):
        from datetime import datetime
        try:
            return datetime.fromisoformat(updated).timestamp()
        except ValueError:
            return None
    return None


def controller_inputs(mesh: Mesh, ca: CertificateAuthority, connect: Callable[[ManagedHost], Connector],
                      create_on: Collection[str], warn: Warn, script: bytes, forks: int = 20,
                      live: bool | None = None) -> ControllerInputs | None:
    """Everything the plan's controller part needs; None when the mesh has no controller. `create_on`: the
    controllers where a missing key is made (a deploy's targets; none for `mesh plan` and check mode, which only
    read), and the controllers' intermediate is made when it names any."""
    if not mesh.controllers:
        return None
    names = [host.name for host in mesh.controllers]
    read = controller_keys(mesh.controllers, connect, create_on, warn, forks)
    keys = with_recorded(read, recorded_keys(mesh.settings.state_dir), names, warn)
    if create_on:  # a deploy (never `mesh plan` or check mode) records what it read
        record_keys(mesh.settings.state_dir, keys)
    issuer = ca.controller_issuer(create=bool(create_on))
    known = {host.name: known_hosts_lines(host) for host in mesh.hosts}
    for host in mesh.hosts:
        if not known[host.name]:
            warn(f"no known_hosts line names {host.name} ({host.connection.address}): its controllers cannot check "
                 "its host key and will not reach it")
    return ControllerInputs(keys=keys, known_hosts=known, issuer_cert=issuer.cert_pem if issuer else None,
                            issuer_key=issuer.key_pem if issuer else None, ctl_script=script,
                            endpoints_live=controller_active(mesh, warn) if live is None else live)
