"""The health checker's configuration (`/etc/mesh/checker/checker.json`): parsing, validating, writing it.

It owns the file's shape and its defaults; it must not probe, talk to Consul or read key material.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.errors import MeshError

if TYPE_CHECKING:  # controllers run the checker without the inventory code's dependencies
    from mesh.inventory.model import Mesh

CONFIG_DIR = "/etc/mesh/checker"
DEFAULT_CONFIG = f"{CONFIG_DIR}/checker.json"
# the checker's leaf and key (0600, the checker's user's), behind a `tls` link swapped when the key changes
CERT_FILE = f"{CONFIG_DIR}/tls/cert.pem"
KEY_FILE = f"{CONFIG_DIR}/tls/key.pem"
CA_FILE = f"{CONFIG_DIR}/ca.pem"  # the mesh CA's root: the checker's trust bundle
TOKEN_FILE = f"{CONFIG_DIR}/consul-token"  # 0600, owned by the checker's user
CONSUL_CA_FILE = f"{CONFIG_DIR}/consul-ca.pem"
CHECKER_USER = "mesh-checker"  # the checker's own unprivileged system user


def lock_key(mesh_id: str) -> str:
    """The checker's Consul lock, under the mesh's own KV prefix `mesh/<mesh_id>/`."""
    return f"mesh/{mesh_id}/health-checker/leader"


LOCK_KEY = lock_key("mesh.local")  # the default mesh id's (the default trust domain)
INSTANCE_KEYS = ("id", "service", "host", "address", "proxy_port")


class CheckerConfigError(MeshError):
    """A checker.json the checker refuses: names the file and the key, and what was expected."""


@dataclass(frozen=True)
class Instance:
    """One workload instance to probe through its Envoy's health chain."""

    id: str
    service: str
    host: str
    address: str
    proxy_port: int


@dataclass(frozen=True)
class CheckerConfig:
    """Everything the checker needs; times in seconds."""

    consul_url: str
    trust_domain: str
    cert: str
    key: str
    ca: str
    instances: tuple[Instance, ...] = ()
    interval: float = 5.0
    timeout: float = 2.0
    refresh: float = 60.0  # rewrite an unchanged status this often, so Consul's copy never goes stale
    session_ttl: int = 10  # Consul invalidates a dead leader's session after up to twice this
    lock_key: str = LOCK_KEY
    consul_token_file: str | None = None  # the file holding Consul's ACL token (never the token itself)
    consul_ca: str | None = None  # verifies an https:// consul_url (None: the system's CAs)

    @property
    def sni(self) -> str:
        return f"health.{self.trust_domain}"

    def to_json(self) -> str:
        data = asdict(self)
        data["instances"] = [asdict(instance) for instance in self.instances]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def load_config(path: str | Path) -> CheckerConfig:
    """Read and validate a checker.json."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CheckerConfigError(f"{path}: cannot read the checker configuration: {exc.strerror}") from exc
    except ValueError as exc:
        raise CheckerConfigError(f"{path}: not JSON: {exc}") from exc
    return parse_config(data, str(path))


def parse_config(data: object, origin: str = "checker.json") -> CheckerConfig:
    """Validate the decoded JSON of a checker.json; every refusal names the key."""
    top = _mapping(data, origin, "(top level)")
    known = {"consul_url", "trust_domain", "cert", "key", "ca", "instances", "interval", "timeout",
             "refresh", "session_ttl", "lock_key", "consul_token_file", "consul_ca"}
    unknown = sorted(set(top) - known)
    if unknown:
        raise CheckerConfigError(f"{origin}: {unknown[0]}: unknown key (expected one of {sorted(known)})")
    instances = top.get("instances", [])
    if not isinstance(instances, list):
        raise CheckerConfigError(f"{origin}: instances: expected a list")
    ttl = _number(top, "session_ttl", origin, 10)
    if not 10 <= ttl <= 86400 or ttl != int(ttl):
        raise CheckerConfigError(f"{origin}: session_ttl: expected whole seconds from 10 to 86400 "
                                 "(Consul's range)")
    return CheckerConfig(
        consul_url=_text(top, "consul_url", origin), trust_domain=_text(top, "trust_domain", origin),
        cert=_text(top, "cert", origin), key=_text(top, "key", origin), ca=_text(top, "ca", origin),
        instances=tuple(_instance(item, origin, n) for n, item in enumerate(instances)),
        interval=_number(top, "interval", origin, 5.0), timeout=_number(top, "timeout", origin, 2.0),
        refresh=_number(top, "refresh", origin, 60.0), session_ttl=int(ttl),
        lock_key=_text(top, "lock_key", origin, LOCK_KEY),
        consul_token_file=_optional_text(top, "consul_token_file", origin),
        consul_ca=_optional_text(top, "consul_ca", origin))


def _instance(item: object, origin: str, n: int) -> Instance:
    where = f"instances[{n}]"
    data = _mapping(item, origin, where)
    missing = [key for key in INSTANCE_KEYS if key not in data]
    extra = sorted(set(data) - set(INSTANCE_KEYS))
    if missing or extra:
        raise CheckerConfigError(f"{origin}: {where}: expected exactly the keys {list(INSTANCE_KEYS)}"
                                 + (f", missing {missing}" if missing else "")
                                 + (f", unknown {extra}" if extra else ""))
    port = data["proxy_port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise CheckerConfigError(f"{origin}: {where}.proxy_port: expected an integer 1-65535, got {port!r}")
    text = {key: _text(data, key, origin, where=where) for key in ("id", "service", "host", "address")}
    return Instance(id=text["id"], service=text["service"], host=text["host"], address=text["address"],
                    proxy_port=port)


def _mapping(value: object, origin: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise CheckerConfigError(f"{origin}: {where}: expected an object")
    return value


def _text(data: Mapping[str, Any], key: str, origin: str, default: str | None = None, where: str = "") -> str:
    value = data.get(key, default)
    name = f"{where}.{key}" if where else key
    if value is None:
        raise CheckerConfigError(f"{origin}: {name}: required")
    if not isinstance(value, str) or not value:
        raise CheckerConfigError(f"{origin}: {name}: expected a non-empty string, got {value!r}")
    return value


def _optional_text(data: Mapping[str, Any], key: str, origin: str) -> str | None:
    return None if data.get(key) is None else _text(data, key, origin)


def _number(data: Mapping[str, Any], key: str, origin: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise CheckerConfigError(f"{origin}: {key}: expected a positive number of seconds, got {value!r}")
    return float(value)


def checker_config(mesh: Mesh, config_dir: str = CONFIG_DIR) -> CheckerConfig:
    """The checker.json a deploy writes on every controller: every workload instance of the mesh, hosts in
    inventory order, each host's by Consul ID (reordering a host's workloads changes nothing)."""
    settings = mesh.settings
    if not settings.consul_url:
        raise CheckerConfigError("mesh_consul_url is required for the health checker")
    instances = tuple(
        Instance(id=workload.consul_id, service=workload.service, host=host.name,
                 address=host.connection.address, proxy_port=workload.proxy_port)
        for host in mesh.hosts for workload in sorted(host.workloads, key=lambda workload: workload.consul_id))
    return CheckerConfig(consul_url=settings.consul_url, trust_domain=settings.trust_domain,
                         cert=f"{config_dir}/tls/cert.pem", key=f"{config_dir}/tls/key.pem",
                         ca=f"{config_dir}/ca.pem", instances=instances, lock_key=lock_key(settings.id),
                         consul_token_file=f"{config_dir}/consul-token" if settings.consul_token_file else None,
                         consul_ca=f"{config_dir}/consul-ca.pem" if settings.consul_ca_file else None)
