"""A fake Consul KV for the traffic commands (overrides by service, check-and-set indexes, the controllers'
report) and an inventory with a two-version api, a caller and a TCP db. Shared by test_traffic_commands.py and
test_rollout.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mesh.inventory.check import check_inventory
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh
from mesh.runtime_kv import Stored
from mesh.traffic.kv import AppliedTraffic, decode_override

INVENTORY = """\
all:
  vars:
    mesh_trust_domain: lab.mesh
    mesh_consul_url: http://127.0.0.1:1
    mesh_state_dir: state
{services}
  children:
    mesh_controllers:
      hosts:
        ctl1: {{ansible_host: 10.0.0.3}}
    vms:
      hosts:
        vm1:
          ansible_host: 10.0.0.11
          mesh_workloads:
            - {{service: web, port: 8080, upstreams: [{{service: api, local_port: 19101}}, {{service: db, local_port: 19102}}]}}
        vm2:
          ansible_host: 10.0.0.12
          mesh_workloads:
            - {{service: api, version: v1, port: 9090}}
            - {{service: api, version: v2, port: 9091}}
            - {{service: db, port: 5432, protocol: tcp}}
"""

API_POLICY = """\
    mesh_services:
      api:
        timeout: 2s
        routes:
          - match: {headers: {x-canary: "1"}}
            to: {v2: 100}
"""


def write_inventory(folder: Path, services: str = API_POLICY) -> Path:
    path = folder / "inventory.yml"
    path.write_text(INVENTORY.format(services=services.rstrip("\n")))
    return path


def load_mesh(path: Path) -> Mesh:
    return check_inventory(load_inventory(str(path)), str(path)).mesh


Controller = Callable[["FakeTraffic"], Mapping[str, str] | None]


def instant(store: FakeTraffic) -> Mapping[str, str]:
    """A controller that applies what is stored before anyone reads its report (api's caller exists)."""
    return {service: store.revision_of(service) for service in ("api", *store.values)}


class FakeTraffic:
    """Consul's `mesh/<id>/traffic/` keys in a dict, with ModifyIndexes; `controller` makes the report
    (None: no controller is active)."""

    def __init__(self, controller: Controller | None = instant, lock_held: bool = True,
                 decode: Callable[[str, str, int], Stored[Any]] = decode_override) -> None:
        self.decode = decode  # another kind of override (mesh authz deny's) reads its values with its own
        self.values: dict[str, tuple[str, int]] = {}
        self.index = 10
        self.controller = controller
        self.lock_held = lock_held
        self.log: list[tuple[str, str]] = []  # (write|delete, service)
        self.refuse_writes = 0  # check-and-set failures to simulate (someone else wrote first)
        self.reads_of_report = 0

    def put(self, service: str, value: object) -> None:
        """Store a value as someone else would (a raw string, or JSON of anything else)."""
        self.index += 1
        self.values[service] = (value if isinstance(value, str) else json.dumps(value), self.index)

    def document(self, service: str) -> dict[str, object]:
        return dict(json.loads(self.values[service][0]))

    def revision_of(self, service: str) -> str:
        stored = self.read(service)
        return stored.override.revision if stored is not None and stored.override is not None else ""

    def read(self, service: str) -> Stored[Any] | None:
        if service not in self.values:
            return None
        value, index = self.values[service]
        return self.decode(service, value, index)

    def read_all(self) -> Mapping[str, Stored[Any]]:
        return {service: item for service in sorted(self.values) if (item := self.read(service)) is not None}

    def write(self, service: str, value: str, index: int) -> bool:
        current = self.values.get(service, ("", 0))[1]
        if self.refuse_writes:
            self.refuse_writes -= 1
            self.put(service, self.values.get(service, ('{"split": null, "fault": null, "revision": "other"}',))[0])
            return False
        if index != current:
            return False
        self.put(service, value)
        self.log.append(("write", service))
        return True

    def delete(self, service: str, index: int) -> bool:
        if self.values.get(service, ("", -1))[1] != index:
            return False
        del self.values[service]
        self.log.append(("delete", service))
        return True

    def applied(self) -> AppliedTraffic:
        self.reads_of_report += 1
        revisions = self.controller(self) if self.controller is not None else None
        if revisions is None:
            reason = "nobody holds the controllers' lock" if not self.lock_held else "its state is older than 60s"
            return AppliedTraffic(False, reason, self.lock_held)
        return AppliedTraffic(True, None, True, MappingProxyType(dict(revisions)))
