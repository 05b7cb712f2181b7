"""The controller's loop: leadership, the Consul watches (services' health, the traffic overrides' and the
authorization denies' KV prefixes),
debounced snapshots pushed to every host, renewals, the published state and metrics; SIGHUP re-reads the spec,
SIGTERM releases the lock.

It wires the parts together and owns timing (debounce, rounds, publishing); what is pushed is pusher.py's,
which endpoints snapshot.py's. A Controller is an object: two can run in one test.

Failover: a controller that stops releases the lock and a standby takes it within a third of the session TTL; one
that dies holds it until Consul invalidates its session, up to twice the TTL (spec.session_ttl_s, 10 s), and
fences itself (pushes nothing) once it has not renewed for one TTL. Standbys run the Consul watch too, so a new
leader pushes the current endpoints at once (after reading every host's state).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol

import consul
import structlog

from mesh.catalog import ConsulAccess, connect, read_token
from mesh.config import paths
from mesh.config.xds import XDS_PORT
from mesh.controller.consul_watch import ConsulWatch, Fetch, PrefixWatch, consul_fetch, consul_kv_fetch
from mesh.controller.endpoints import EdsRenders, ServiceEndpoints
from mesh.controller.inbound import Denies, Rules, applied_authz, inbound_rules, read_denies
from mesh.controller.lastgood import FilesPace
from mesh.controller.metrics import ControllerMetrics
from mesh.controller.protocol import relpath_in
from mesh.controller.published import state_document, state_text
from mesh.controller.pusher import MAX_WORKERS, Pusher, Validate
from mesh.controller.renewal import Renewer
from mesh.controller.rotation import SignedLeaf, issued_record, load_signer, remaining_s
from mesh.controller.routes import (
    Overrides,
    RoutePolicies,
    applied_traffic,
    effective_policies,
    read_overrides,
)
from mesh.controller.snapshot import (
    Built,
    KnownEndpoints,
    Snapshot,
    build_snapshot,
    remembered,
    watched_services,
)
from mesh.controller.spec import (
    CONTROLLER_DIR,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    ROOT_CERT,
    SSH_KEY,
    ControllerSpec,
    IdentitySpec,
    authz_prefix,
    deploy_lock_key,
    issued_prefix,
    traffic_prefix,
    xds_status_prefix,
)
from mesh.controller.transport import SshTransport, Transport
from mesh.controller.xds_feed import ServerFactory, XdsFeed, xds_proxies
from mesh.dashboard.gather import controller_reading
from mesh.dashboard.service import ControllerDashboard, start_dashboard
from mesh.dashboard.view import ControllerReading
from mesh.errors import MeshError
from mesh.healthcheck.leader import Leadership, holder_id
from mesh.traces.api import traces_api
from mesh.traces.receiver import SpanReceiver
from mesh.traces.serving import ControllerCertificate
from mesh.traces.store import TraceStore

SESSION_NAME = "mesh-controller"
XDS_TEST_HOOK = f"{CONTROLLER_DIR}/xds-test-hook.json"  # root's file on the controller host; absent in production
XDS_STREAMS_READ_S = 2.0  # the leader reads every controller's streams at most this often (route/deny applied)
XDS_PUBLISH_INTERVAL_S = 2.0
XDS_PUBLISH_CHUNK = 200  # streams per KV value (chunks left by a larger fleet age out: mesh.xds.status)  # each controller's ADS streams (`mesh status` per proxy and type) at most this often
ROUND_INTERVAL_S = 1.0  # a round with nothing new costs no I/O but reconnecting hosts and due renewals
PUBLISH_INTERVAL_S = 5.0
DEPLOY_POLL_S = 0.5


class ControllerLeadership(Leadership):
    session_name = SESSION_NAME


class Leader(Protocol):
    def step(self) -> bool: ...

    def holds(self) -> bool: ...

    def release(self) -> None: ...


class Store(Protocol):
    """The Consul KV the loop reads and writes (besides the lock)."""

    def deploy_locked(self) -> bool: ...

    def put(self, key: str, value: str) -> None: ...

    def values(self, prefix: str) -> list[bytes]: ...


class ConsulStore:
    """Store over py-consul; a failed read of the deploy lock keeps the last answer (the lock fences anyway)."""

    def __init__(self, access: ConsulAccess, mesh_id: str) -> None:
        self.client = connect(access)
        self.key = deploy_lock_key(mesh_id)
        self.locked = False

    def deploy_locked(self) -> bool:
        try:
            _index, item = self.client.kv.get(self.key)
        except (consul.ConsulException, OSError):
            return self.locked
        self.locked = bool(item and item.get("Session"))
        return self.locked

    def put(self, key: str, value: str) -> None:
        self.client.kv.put(key, value)

    def values(self, prefix: str) -> list[bytes]:
        """Every value under the KV prefix (empty when Consul cannot be read)."""
        try:
            _index, items = self.client.kv.get(prefix, recurse=True)
        except (consul.ConsulException, OSError):
            return []
        return [item["Value"] for item in items or [] if item.get("Value")]


@dataclass(frozen=True)
class ControllerOptions:
    """Where the controller's own files are (the spec's defaults on a controller host; elsewhere in tests)."""

    key_path: str = SSH_KEY
    intermediate_cert: str = INTERMEDIATE_CERT
    intermediate_key: str = INTERMEDIATE_KEY
    root_cert: str = ROOT_CERT  # the trust bundle the controller's own validation uses
    envoy: str = paths.ENVOY_BINARY
    holder: str | None = None
    serve_metrics: bool = True
    round_interval_s: float = ROUND_INTERVAL_S
    publish_interval_s: float = PUBLISH_INTERVAL_S
    push_workers: int = MAX_WORKERS  # hosts pushed to at once
    xds_port: int = XDS_PORT  # the ADS server's port, while the spec has an xds proxy
    xds_test_hook: str = XDS_TEST_HOOK  # tests only: a NACK provoked on purpose (mesh.xds.server)


def consul_access(spec: ControllerSpec) -> ConsulAccess:
    token = read_token(spec.consul_token_file) if spec.consul_token_file else None
    return ConsulAccess(spec.consul_url, token, spec.consul_ca_file)


def envoy_validator(envoy: str, root_cert: str) -> Validate:
    """validate_proxy_files with the controller's Envoy and the mesh's root as the trust bundle."""
    from mesh.render import validate_proxy_files  # imports the config model: only when validating for real

    try:
        with open(root_cert, "rb") as handle:
            ca_pem = handle.read()
    except OSError as exc:
        raise MeshError(f"cannot read the mesh root {root_cert}: {exc.strerror}") from None
    return lambda files: validate_proxy_files(files, ca_pem, envoy)


class Controller:
    """One controller. `run()` blocks until `stop()`; `tick()` is one pass of the loop (tests drive it)."""

    def __init__(self, load: Callable[[], ControllerSpec], options: ControllerOptions = ControllerOptions(),
                 transport: Transport | None = None, validate: Validate | None = None,
                 leader: Callable[[ControllerSpec, str], Leader] | None = None,
                 store: Callable[[ControllerSpec], Store] | None = None,
                 fetch: Callable[[ControllerSpec], Callable[[], Fetch]] | None = None,
                 kv_fetch: Callable[[ControllerSpec], Fetch] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC), watch: bool = True,
                 xds_server: ServerFactory | None = None) -> None:
        self.load = load
        self.options = options
        self.clock, self.wall, self.now = clock, wall, now
        self.log = structlog.get_logger()
        self.spec = load()
        self.holder = options.holder or holder_id()
        self.metrics = ControllerMetrics()
        self.transport = transport or SshTransport(options.key_path)
        self.validate = validate or envoy_validator(options.envoy, options.root_cert)
        self.pusher = Pusher(self.transport, self.validate, self.metrics, max_workers=options.push_workers,
                             clock=clock, wall=wall)
        self.pusher.set_hosts(self.spec.hosts)
        self.xds = XdsFeed(xds_server or (lambda spec: xds_server_for(spec, options)), options.root_cert)
        self.pusher.ads_up = lambda: self.xds.serving
        self.files_pace = FilesPace()  # xds proxies' last-known-good files follow their snapshot slowly
        self.files_snapshot: Snapshot = {}  # what the pushes carry (self.snapshot, with xds proxies paced)
        self.files_due: float | None = None  # when a held-back xds proxy's files are next due
        self.next_xds_publish = float("-inf")
        self.xds_streams: Mapping[str, object] = {}  # node id -> StreamStatus, every controller's (read from Consul)
        self.xds_streams_at: float | None = None
        self.leader = (leader or _consul_leader)(self.spec, self.holder)
        self.store = (store or (lambda spec: ConsulStore(consul_access(spec), spec.mesh_id)))(self.spec)
        self.renewer = self._renewer(self.spec)
        self.traces = TraceStore()  # spans from the proxies (the span receiver's, when spec.trace_port)
        self.span_receiver: SpanReceiver | None = None
        self.span_receiver_of: tuple[int, str, int] | None = None  # (trace_port, trust_domain, cert_ttl_s) it runs
        self.dashboard: ControllerDashboard | None = None  # the loopback web server (dashboard, traces API)
        self.lock = threading.Condition()
        self.known: KnownEndpoints = MappingProxyType({})
        self.traffic_values: Mapping[str, str] | None = None  # the traffic KV (service -> value); None: not read yet
        self.overrides: Overrides | None = None
        self.policies: RoutePolicies | None = None
        self.policies_of: tuple[ControllerSpec, Mapping[str, str] | None] | None = None
        self.ignored: dict[str, str] = {}  # service -> the invalid KV value already logged
        self.traffic: dict[str, str] = {}  # service -> override revision every caller runs (state.traffic)
        self.authz_values: Mapping[str, str] | None = None  # the authorization KV (service -> value); None: not read
        self.denies: Denies | None = None
        self.rules: Rules | None = None
        self.rules_of: tuple[ControllerSpec, Mapping[str, str] | None] | None = None
        self.authz_ignored: dict[str, str] = {}  # service -> the invalid KV value already logged
        self.authz: dict[str, str] = {}  # service -> deny revision every instance runs (state.authz)
        self.dirty, self.dirty_since = True, clock()
        self.stopping = False
        self.stopped = threading.Event()
        self.leadership_thread: threading.Thread | None = None  # run() steps the lock in a thread of its own
        self.reload_requested = False
        self.leading = False
        self.paused = False
        self.next_step = float("-inf")
        self.next_round = float("-inf")
        self.next_publish = float("-inf")
        self.snapshot: Snapshot = {}
        self.snapshot_of: tuple[ControllerSpec, KnownEndpoints, RoutePolicies | None, Rules | None] | None = None
        self.eds_renders = EdsRenders()  # EDS rewrites shared by the proxies and builds of the snapshot
        self.pushed_digest: str | None = None  # the plan digest of the last spec a round reached every host with
        self.behind: tuple[str, ...] = ()
        make_fetch = (fetch or (lambda spec: lambda: consul_fetch(consul_access(spec))))(self.spec)
        self.watch = ConsulWatch(self.spec.mesh_id, make_fetch, self.on_answer)
        make_kv_fetch = kv_fetch or (lambda spec: consul_kv_fetch(consul_access(spec)))
        self.traffic_watch = PrefixWatch(traffic_prefix(self.spec.mesh_id), make_kv_fetch(self.spec), self.on_traffic)
        self.authz_watch = PrefixWatch(authz_prefix(self.spec.mesh_id), make_kv_fetch(self.spec), self.on_authz)
        self.watching = watch

    # --- inputs (other threads) ---

    def on_answer(self, seen: ServiceEndpoints) -> None:
        """A watch's new answer: remember the chosen endpoints; a change starts the debounce."""
        with self.lock:
            known = remembered(self.known, seen)
            if known is self.known:
                return
            self.known = known
            if not self.dirty:
                self.dirty, self.dirty_since = True, self.clock()
            self.lock.notify_all()

    def on_traffic(self, values: Mapping[str, str]) -> None:
        """The traffic KV prefix's new values (service -> override JSON): a change starts the debounce."""
        with self.lock:
            if values == self.traffic_values:
                return
            self.traffic_values = MappingProxyType(dict(values))
            if not self.dirty:
                self.dirty, self.dirty_since = True, self.clock()
            self.lock.notify_all()

    def on_authz(self, values: Mapping[str, str]) -> None:
        """The authorization KV prefix's new values (service -> deny JSON): a change starts the debounce."""
        with self.lock:
            if values == self.authz_values:
                return
            self.authz_values = MappingProxyType(dict(values))
            if not self.dirty:
                self.dirty, self.dirty_since = True, self.clock()
            self.lock.notify_all()

    def dashboard_reading(self) -> ControllerReading:
        """What the dashboard shows of this controller, copied under its lock (read-only)."""
        with self.lock:
            return controller_reading(self.spec, self.holder, self.leading, self._staleness_s(), self.pusher,
                                      self.snapshot, self.behind, self.overrides.valid if self.overrides else None,
                                      self.denies.valid if self.denies else None)

    def request_reload(self) -> None:
        with self.lock:
            self.reload_requested = True
            self.lock.notify_all()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.stopped.set()
            self.lock.notify_all()

    # --- the loop ---

    def run(self) -> None:
        if self.options.serve_metrics:
            self.metrics.serve(self.spec.metrics_port)
        self._keep_span_receiver()
        self.xds.keep(self.spec)
        if self.options.serve_metrics:  # every controller: `mesh dashboard` and `mesh trace` ask its loopback
            self.dashboard = start_dashboard(self.spec.web_port, self.dashboard_reading, consul_access(self.spec),
                                             lambda query: traces_api(self.traces, query))
        if self.watching:
            self.watch.watch(watched_services(self.spec))
            self.traffic_watch.start()
            self.authz_watch.start()
        self.leadership_thread = threading.Thread(target=self._keep_leadership, name="leadership", daemon=True)
        self.leadership_thread.start()
        self.log.info("controller_started", holder=self.holder, mesh_id=self.spec.mesh_id,
                      hosts=len(self.spec.hosts), plan_digest=self.spec.plan_digest[:12])
        try:
            while True:
                wait = self.tick()
                with self.lock:
                    if self.stopping:
                        break
                    if not self.reload_requested:
                        self.lock.wait(timeout=wait)
        finally:
            self.shutdown()

    def tick(self) -> float:
        """One pass: leadership, then (leading, no deploy running) a round when something changed or it is
        time; returns how long to wait before the next pass."""
        if self.reload_requested:
            self._reload()
        now = self.clock()
        if self.leadership_thread is None and now >= self.next_step:
            self.leader.step()
            self.next_step = now + self._step_interval()
        leading = self.leader.holds()
        if leading != self.leading:
            self.leading = leading
            self.log.info("controller_leading" if leading else "controller_standby", holder=self.holder)
            if not leading:
                self.pusher.forget()  # another controller may push meanwhile: read every host again
        self.metrics.leader.set(1 if leading else 0)
        self.metrics.consul_staleness.set(self._staleness_s())
        if self.xds.serving and self.clock() >= self.next_xds_publish:
            self._publish_xds()
        if not leading:
            wait = min(1.0, max(0.0, self.next_step - now)) if self.leadership_thread is None else 1.0
            if not self.xds.serving:
                return wait
            with self.lock:  # a standby serves ADS from its own snapshot too
                dirty, since = self.dirty, self.dirty_since
            debounce = self.spec.debounce_ms / 1000
            if dirty and now - since < debounce:
                return min(wait, since + debounce - now)
            if dirty:
                self._refresh_snapshot()
            return wait
        with self.lock:
            dirty, since = self.dirty, self.dirty_since
        debounce = self.spec.debounce_ms / 1000
        if dirty and now - since < debounce:
            return since + debounce - now
        if dirty or now >= self.next_round or (self.files_due is not None and now >= self.files_due):
            self._round()
        if self.clock() >= self.next_publish:
            self._publish()
        now = self.clock()
        step = self.next_step if self.leadership_thread is None else now + 1.0
        return max(0.0, min(self.next_round, self.next_publish, step) - now)

    def _staleness_s(self) -> float:
        if not self.watching:
            return self.watch.staleness_s()
        return max(self.watch.staleness_s(), self.traffic_watch.staleness_s(), self.authz_watch.staleness_s())

    def _step_interval(self) -> float:
        return max(0.5, self.spec.session_ttl_s / 3)

    def _keep_leadership(self) -> None:
        """Renew the session and try the lock every ttl/3, whatever the pushes are doing (a slow host must not
        cost the lock); wakes the loop so a change of leadership is seen at once."""
        while not self.stopped.is_set():
            self.leader.step()
            with self.lock:
                self.lock.notify_all()
            self.stopped.wait(self._step_interval())

    def _round(self) -> None:
        if self.store.deploy_locked():
            if not self.paused:
                self.log.info("controller_paused", reason="a deploy holds its lock")
            self.paused = True
            self.next_round = self.clock() + DEPLOY_POLL_S
            return
        if self.paused:
            self.log.info("controller_resumed")
            self.paused = False
            self.pusher.reread()  # the deploy just released its lock: what it wrote is on the hosts now
        spec = self._refresh_snapshot()
        self.files_snapshot, self.files_due = self.files_pace.paced(self.snapshot, set(xds_proxies(spec)),
                                                                    self.clock())
        result = self.pusher.round(self.files_snapshot, self.leader.holds,
                                   self.renewer.renew if self.renewer else None, wait_s=self.options.round_interval_s)
        self.behind = result.behind
        self._certificate_metrics()
        traffic, authz = self._applied()
        reached = spec.plan_digest if not result.behind else self.pushed_digest
        if result.pushed or result.refused or reached != self.pushed_digest or traffic != self.traffic \
                or authz != self.authz:
            self.pushed_digest = reached
            self.traffic, self.authz = traffic, authz
            self.next_publish = self.clock()  # publish now
        self.next_round = self.clock() + self.options.round_interval_s

    def _refresh_snapshot(self) -> ControllerSpec:
        """The snapshot of the current inputs (rebuilt only when one changed), offered to the ADS server."""
        with self.lock:
            self.dirty = False
            known, values, authz_values = self.known, self.traffic_values, self.authz_values
        spec = self.spec
        policies = self._policies(spec, values)
        rules = self._rules(spec, authz_values)
        inputs = (spec, known, policies, rules)
        if self.snapshot_of is None or any(mine is not now for mine, now in zip(self.snapshot_of, inputs, strict=True)):
            previous = Built(self.snapshot, *self.snapshot_of) if self.snapshot_of is not None else None
            self.snapshot = build_snapshot(spec, known, policies, rules, previous, self.eds_renders)
            self.snapshot_of = inputs
        self.xds.offer(spec, self.snapshot, self.pusher.refusal)
        return spec

    def _xds_streams(self) -> Mapping[str, object]:
        """Every controller's published ADS streams (mesh.xds.status.merged), read at most every 2 s."""
        if not self.xds.serving:
            return {}
        now = self.clock()
        if self.xds_streams_at is None or now - self.xds_streams_at >= XDS_STREAMS_READ_S:
            from mesh.xds.status import merged, parse_publication

            found = self.store.values(xds_status_prefix(self.spec.mesh_id))
            self.xds_streams = merged([parse_publication(value) for value in found], self.wall())
            self.xds_streams_at = now
        return self.xds_streams

    def _publish_xds(self) -> None:
        """This controller's ADS streams, per proxy and type (synced, stale, NACKed), for `mesh status`."""
        from mesh.xds.status import publication

        self.next_xds_publish = self.clock() + XDS_PUBLISH_INTERVAL_S
        streams = self.xds.status()
        nodes = sorted(streams)
        chunks = [nodes[start:start + XDS_PUBLISH_CHUNK] for start in range(0, len(nodes), XDS_PUBLISH_CHUNK)] or [[]]
        try:  # in chunks: a Consul KV value holds at most 512 KiB (a stream is about 1 KB)
            for number, chunk in enumerate(chunks):
                text = json.dumps(publication(self.holder, {node: streams[node] for node in chunk}, self.wall()),
                                  sort_keys=True)
                self.store.put(f"{xds_status_prefix(self.spec.mesh_id)}{self.holder}/{number}", text)
        except (consul.ConsulException, OSError) as exc:
            self.log.warning("xds_status_not_published", error=str(exc).splitlines()[0] if str(exc) else "")

    def _policies(self, spec: ControllerSpec, values: Mapping[str, str] | None) -> RoutePolicies | None:
        """Each service's effective policy (the spec's, with its valid override), redone when the spec or the KV
        changed; an invalid override is logged once per value. None before the KV was read."""
        if self.policies_of is not None and self.policies_of[0] is spec and self.policies_of[1] is values:
            return self.policies
        self.policies_of = (spec, values)
        if values is None:
            self.overrides, self.policies = None, None
            return None
        before = self.overrides
        overrides = read_overrides(values, spec)
        self._log_ignored("traffic_override_ignored", "the inventory policy applies", overrides.invalid, values,
                          self.ignored)
        for service in sorted(set(overrides.valid) | set(before.valid if before else {})):
            revision = overrides.revision(service)
            if before is None or before.revision(service) != revision or (service in before.valid) != (
                    service in overrides.valid):
                self.log.info("traffic_override", service=service, revision=revision or None,
                              override=service in overrides.valid)
        self.overrides, self.policies = overrides, MappingProxyType(effective_policies(spec, overrides))
        return self.policies

    def _rules(self, spec: ControllerSpec, values: Mapping[str, str] | None) -> Rules | None:
        """Each served service's inbound rules (the spec's policy, with its valid run-time deny), redone when the
        spec or the KV changed; an invalid deny is logged once per value. None before the KV was read."""
        if self.rules_of is not None and self.rules_of[0] is spec and self.rules_of[1] is values:
            return self.rules
        self.rules_of = (spec, values)
        if values is None:
            self.denies, self.rules = None, None
            return None
        before = self.denies
        denies = read_denies(values, spec)
        self._log_ignored("authz_deny_ignored", "the inventory's rules apply alone", denies.invalid, values,
                          self.authz_ignored)
        for service in sorted(set(denies.valid) | set(before.valid if before else {})):
            if before is None or before.valid.get(service) != denies.valid.get(service):
                deny = denies.valid.get(service)
                self.log.info("authz_deny", service=service, revision=denies.revision(service) or None,
                              deny_from=list(deny.deny_from) if deny else [])
        self.denies, self.rules = denies, MappingProxyType(inbound_rules(spec, denies))
        return self.rules

    def _log_ignored(self, event: str, effect: str, invalid: Mapping[str, str], values: Mapping[str, str],
                     logged: dict[str, str]) -> None:
        """A warning per invalid KV value (service -> reason), once per value: `logged` holds the values already
        logged (service -> value) and forgets the services whose value is no longer invalid."""
        for service, reason in invalid.items():
            if logged.get(service) != values[service]:
                logged[service] = values[service]
                self.log.warning(event, service=service, reason=reason, effect=effect)
        for service in set(logged) - set(invalid):
            del logged[service]

    def _applied(self) -> tuple[dict[str, str], dict[str, str]]:
        """state.traffic and state.authz: per service, the revision every file carrying it runs (routes.py,
        inbound.py)."""
        wanted = {(host.name, proxy.name, relpath_in(proxy.proxy_dir, path)):
                  self.snapshot[(host.name, proxy.name)].files.file(path).sha256
                  for host in self.spec.hosts for proxy in host.proxies for path in (*proxy.routes, *proxy.inbound)
                  if (host.name, proxy.name) in self.snapshot}
        on_hosts = {(name, proxy.name): (link.state.files.get(proxy.name) if link.state is not None else None)
                    for name, link in self.pusher.links.items() for proxy in link.spec.proxies}
        # an xds proxy runs its snapshot once its stream (on any controller) acknowledged every type of it: its
        # files on the host follow only at a slow pace
        for key, node_id in xds_proxies(self.spec).items():
            if key in self.snapshot and self.xds.acked(node_id, self.snapshot[key].version, self._xds_streams()):
                on_hosts[key] = {**(on_hosts.get(key) or {}), **self.snapshot[key].digests}
        return (applied_traffic(self.spec, self.overrides if self.policies is not None else None, wanted, on_hosts),
                applied_authz(self.spec, self.denies if self.rules is not None else None, wanted, on_hosts))

    def _publish(self) -> None:
        self.next_publish = self.clock() + self.options.publish_interval_s
        if not self.leader.holds():
            return
        certificates = {(name, identity): cert for name, link in self.pusher.links.items() if link.state
                        for identity, cert in link.state.certs.items()}
        document = state_document(self.holder, self.pushed_digest, self.wall(), self.watch.staleness_s(),
                                  self.pusher.wanted_versions(self.files_snapshot), self.pusher.host_versions(),
                                  self.pusher.pushed_at, certificates,
                                  self.behind, self.traffic, self.authz)
        try:
            self.store.put(self.spec.state_key, state_text(document))
        except (consul.ConsulException, OSError) as exc:
            self.log.warning("controller_state_not_published", error=str(exc).splitlines()[0] if str(exc) else "")

    def _certificate_metrics(self) -> None:
        now = self.now()
        remaining = {(name, identity): seconds for name, link in self.pusher.links.items() if link.state
                     for identity, seconds in remaining_s(link.state.certs, now).items()}
        self.metrics.certificates(remaining)

    def _reload(self) -> None:
        self.reload_requested = False
        try:
            spec = self.load()
        except MeshError as exc:
            self.log.error("controller_spec_refused", error=str(exc))
            return
        if (spec.mesh_id, spec.consul_url) != (self.spec.mesh_id, self.spec.consul_url):
            self.log.error("controller_spec_refused", error="mesh_id and consul_url change only with a restart")
            return
        self.spec = spec
        self.pusher.set_hosts(spec.hosts)
        self.renewer = self._renewer(spec)
        self._keep_span_receiver()
        self.xds.keep(spec)
        if self.watching:
            self.watch.watch(watched_services(spec))
        with self.lock:
            self.dirty, self.dirty_since = True, self.clock()
        self.log.info("controller_spec_loaded", plan_digest=spec.plan_digest[:12], hosts=len(spec.hosts))

    def _renewer(self, spec: ControllerSpec) -> Renewer | None:
        try:
            signer = load_signer(spec.trust_domain, self.options.intermediate_cert, self.options.intermediate_key)
        except MeshError as exc:
            self.log.error("controller_cannot_sign", error=str(exc), effect="certificates are not renewed")
            return None
        return Renewer(spec, signer, self._record, now=self.now, clock=self.clock)

    def _keep_span_receiver(self) -> None:
        """The span receiver the spec asks for: on spec.trace_port > 0 on every controller, not only the leader
        (proxies spread their spans over them all); started, stopped or restarted when a reload changes it."""
        spec = self.spec
        wanted = (spec.trace_port, spec.trust_domain, spec.cert_ttl_s) if spec.trace_port > 0 else None
        if wanted == self.span_receiver_of:
            return
        if self.span_receiver is not None:
            self.span_receiver.stop()
            self.span_receiver = None
        self.span_receiver_of = wanted
        if wanted is not None:
            self.span_receiver = span_receiver(spec, self.options, self.traces)
            self.span_receiver.start()

    def _record(self, host: str, identity: IdentitySpec, leaf: SignedLeaf, issued_at: datetime) -> None:
        record = issued_record(host, identity.name, identity.spiffe_id, leaf, issued_at)
        self.store.put(issued_prefix(self.spec.mesh_id) + leaf.serial, json.dumps(record, sort_keys=True))

    def shutdown(self) -> None:
        self.stopped.set()
        self.watch.stop()
        self.traffic_watch.stop()
        self.authz_watch.stop()
        if self.leadership_thread is not None:
            self.leadership_thread.join(timeout=30)  # then release: Leadership is one thread's at a time
        self.leader.release()
        self.pusher.close()
        self.metrics.stop()
        if self.span_receiver is not None:
            self.span_receiver.stop()
        self.xds.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        self.log.info("controller_stopped", holder=self.holder)


def span_receiver(spec: ControllerSpec, options: ControllerOptions, store: TraceStore) -> SpanReceiver:
    """The receiver on spec.trace_port: served with the controller's own certificate (its intermediate signs it),
    clients checked against the root bundle."""
    certificate = ControllerCertificate(spec.trust_domain, spec.cert_ttl_s, options.intermediate_cert,
                                        options.intermediate_key)
    return SpanReceiver(store, spec.trace_port, certificate, options.root_cert, spec.trust_domain)


def xds_server_for(spec: ControllerSpec, options: ControllerOptions) -> object:
    """The ADS server on options.xds_port: served with the controller's own certificate (as the span receiver),
    clients checked against the root bundle and by the node id in their certificate."""
    from mesh.xds.server import XdsServer  # grpc and the protobuf classes: loaded only where ADS is served

    certificate = ControllerCertificate(spec.trust_domain, spec.cert_ttl_s, options.intermediate_cert,
                                        options.intermediate_key)
    return XdsServer(options.xds_port, certificate, options.root_cert, spec.trust_domain,
                     test_hook_path=options.xds_test_hook)


def _consul_leader(spec: ControllerSpec, holder: str) -> Leader:
    return ControllerLeadership(consul_access(spec), spec.lock_key, spec.session_ttl_s, holder)



def serve(load: Callable[[], ControllerSpec], options: ControllerOptions = ControllerOptions()) -> int:
    """Run a controller in this process until SIGTERM (or SIGINT): SIGHUP re-reads the spec; the lock is
    released on the way out. Exit code 0. Call from the main thread (signal handlers)."""
    import signal

    controller = Controller(load, options)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: controller.request_reload())
    signal.signal(signal.SIGTERM, lambda _signum, _frame: controller.stop())
    signal.signal(signal.SIGINT, lambda _signum, _frame: controller.stop())
    controller.run()
    return 0
