"""The plan's I/O edges: every distinct proxy config checked by the local Envoy before any host is touched, and
every planned host observed in parallel (one command each) and compared with its plan. It owns the order and
the parallelism; what to read and what differs are observe.py's and changes.py's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mesh.config.errors import EnvoyRejectedConfig
from mesh.errors import MeshError
from mesh.hosts.connection import Connector
from mesh.hosts.observe import HostFacts, observe, read_texts
from mesh.inventory.model import ManagedHost
from mesh.plan.changes import CertificateReason, Change, host_changes, observe_request
from mesh.plan.model import HostPlan, Plan, ProxyPlan
from mesh.render import validate_proxy_files

MAX_REASON = 700


class PlanRefused(MeshError):
    """The local Envoy refused a planned config: nothing was touched (exit 1)."""


@dataclass(frozen=True)
class Observed:
    """One host as observed: its facts and changes, or why it could not be read (unreachable)."""

    host: str
    changes: tuple[Change, ...] = ()
    facts: HostFacts | None = None
    unreachable: str | None = None
    live: frozenset[str] = frozenset()  # a running controller's files: they change without a deploy

    @property
    def fingerprint(self) -> str | None:
        """What the host held when observed, to refuse applying a saved plan to a host changed since."""
        if self.facts is None:
            return None
        data = sorted((path, fact.sha256, fact.mode, fact.uid, fact.gid) for path, fact in self.facts.paths.items()
                      if path not in self.live)
        extra = [sorted(self.facts.running.items()), sorted((s.name, s.revision, s.state)
                                                             for s in self.facts.sidecars.values()),
                 sorted((u.name, u.enabled, u.active) for u in self.facts.units.values()), self.facts.envoy_sha256,
                 self.facts.firewall_loaded, self.facts.rules_in_place, list(self.facts.proxies),
                 list(self.facts.mesh_users)]
        return hashlib.sha256(json.dumps([data, extra], default=str).encode()).hexdigest()


def validate_plan(plan: Plan, ca_pem: bytes, envoy: str, envoy_sha256: str, cache_dir: Path | None = None,
                  workers: int = 4) -> int:
    """Check each distinct proxy config with the local Envoy, in parallel; raises PlanRefused naming the proxy.
    A config this Envoy accepted before (a marker per config in cache_dir) is not checked again. Returns how
    many distinct configs the plan has."""
    distinct: dict[str, tuple[HostPlan, ProxyPlan]] = {}
    for host in plan.hosts:
        for proxy in host.proxies:
            key = hashlib.sha256("\0".join([envoy_sha256, hashlib.sha256(ca_pem).hexdigest(), *(
                f"{item.path}\0{item.sha256}" for item in proxy.rendered.files)]).encode()).hexdigest()
            distinct.setdefault(key, (host, proxy))
    unchecked = {key: pair for key, pair in distinct.items() if cache_dir is None or not (cache_dir / key).exists()}

    def check(item: tuple[str, tuple[HostPlan, ProxyPlan]]) -> tuple[str, str | None]:
        key, (host, proxy) = item
        try:
            validate_proxy_files(proxy.rendered, ca_pem, envoy)
        except EnvoyRejectedConfig as exc:
            reason = str(exc)  # Envoy may echo the whole config after its reason
            reason = reason if len(reason) <= MAX_REASON else reason[:MAX_REASON] + " ..."
            return key, f"Envoy refused the config of proxy {proxy.name} on {host.name}: {reason}"
        return key, None

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mesh-validate") as pool:
        results = list(pool.map(check, unchecked.items()))
    refused = [reason for _, reason in results if reason is not None]
    if refused:
        raise PlanRefused("; ".join(refused[:3]) + (f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""),
                          "nothing was touched: no host was reached")
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for key, _ in results:
            (cache_dir / key).touch()
    return len(distinct)


def observe_fleet(plan: Plan, hosts: Sequence[ManagedHost], connect: Callable[[ManagedHost], Connector],
                  certificate_reason: CertificateReason, checker_marker: str | None = None,
                  diffs: bool = False, forks: int = 20) -> dict[str, Observed]:
    """Each host's changes (with unified diffs when `diffs`), observed in parallel."""
    def one(host: ManagedHost) -> Observed:
        host_plan = plan.host(host.name)
        try:
            connector = connect(host)
        except MeshError as exc:
            return Observed(host.name, unreachable=str(exc))
        try:
            facts = observe(connector, host.name, observe_request(host_plan))
            texts = read_texts(connector, _diffable(host_plan, facts)) if diffs else None
            changes = host_changes(host_plan, facts, certificate_reason, checker_marker, texts)
            live = frozenset(planned.path for planned in host_plan.every_file() if planned.controller_owned)
            return Observed(host.name, changes, facts, live=live)
        except MeshError as exc:
            return Observed(host.name, unreachable=str(exc))
        finally:
            connector.close()
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(hosts) or 1)), thread_name_prefix="mesh-observe") as pool:
        return {observed.host: observed for observed in pool.map(one, hosts)}


def _diffable(plan: HostPlan, facts: HostFacts) -> list[str]:
    """Planned text files whose content on the host differs (never a secret: those are not diffed)."""
    return [planned.path for planned in plan.every_file()
            if planned.text is not None and not planned.controller_owned and facts.path(planned.path).exists
            and facts.path(planned.path).sha256 != planned.sha256]
