"""What the active controller publishes at `mesh/<id>/controller/state` (deploy and `mesh status` read it). Pure.

    {"holder": "ctl1:1234", "plan_digest": "<the spec's, once a round pushed it>", "updated_at": 1765000000.5,
     "consul_stale_s": 0.0, "hosts_behind": ["vm2"],
     "proxies": {"vm1/web-8080": {"version": "<the controller's>", "host_version": "<the host's, or null>",
                                  "pushed_at": 1765000000.2}},
     "certificates": {"vm1/web-8080": {"serial": "0a1b...", "not_after": 1765086400}},
     "traffic": {"api": "r-20261206-1"}, "authz": {"api": "a-20261206-1", "db": ""}}

Times are Unix epoch seconds (UTC). `traffic`: for each service some proxy calls through a route file, the revision
of its traffic override ("" when none) that every caller's route file now reflects; a service is absent while a
caller's file is not there yet (a push pending, refused or a host unreached) and all are before the controller
read the overrides. `mesh route set` waits on it. `authz`: likewise for each service some proxy serves with
inbound authorization files, the revision of its run-time deny (`mesh authz deny`; "" when none) that every
instance's files now reflect; `mesh authz deny` waits on it. It owns this shape; it must not talk to Consul.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mesh.controller.protocol import CertState
from mesh.controller.snapshot import ProxyKey


def state_document(holder: str, plan_digest: str | None, updated_at: float, consul_stale_s: float,
                   versions: Mapping[ProxyKey, str], host_versions: Mapping[ProxyKey, str | None],
                   pushed_at: Mapping[ProxyKey, float], certificates: Mapping[tuple[str, str], CertState | None],
                   hosts_behind: Sequence[str] = (), traffic: Mapping[str, str] | None = None,
                   authz: Mapping[str, str] | None = None) -> dict[str, Any]:
    proxies = {f"{host}/{proxy}": {"version": version, "host_version": host_versions.get((host, proxy)),
                                   "pushed_at": pushed_at.get((host, proxy))}
               for (host, proxy), version in sorted(versions.items())}
    certs = {f"{host}/{name}": {"serial": cert.serial, "not_after": int(cert.not_after.timestamp())}
             for (host, name), cert in sorted(certificates.items()) if cert is not None}
    return {"holder": holder, "plan_digest": plan_digest, "updated_at": round(updated_at, 3),
            "consul_stale_s": round(consul_stale_s, 1), "hosts_behind": sorted(hosts_behind),
            "proxies": proxies, "certificates": certs, "traffic": dict(sorted((traffic or {}).items())),
            "authz": dict(sorted((authz or {}).items()))}


def state_text(document: Mapping[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))
