"""Pushing the snapshot: per host a persistent link (connect, `state`, what the host has), only the changed files
of only the proxies that need them, hosts in parallel, each distinct file set validated once on the controller.

It owns what is sent where and when a refusal is retried (only for another snapshot); it must not compute
files (snapshot.py) or talk to Consul. `pending_proxies` and `bundle_of` are pure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import lru_cache

import structlog

from mesh.config.errors import ConfigError, EnvoyRejectedConfig
from mesh.controller.consul_watch import backoff_s
from mesh.controller.metrics import ControllerMetrics
from mesh.controller.protocol import (
    BundleProxy,
    CtlProtocolError,
    HostState,
    apply_bundle,
    bundle_for,
    command,
    parse_applied,
    parse_state,
)
from mesh.controller.snapshot import ProxyKey, ProxySnapshot, Snapshot
from mesh.controller.spec import HostSpec
from mesh.controller.transport import CtlResult, CtlSession, Transport, TransportError
from mesh.errors import MeshError
from mesh.render import ProxyFiles

STATE_REFRESH_S = 60.0  # re-read a connected host's state this often (someone may have changed its files)
MAX_WORKERS = 32
RESTART_BACKOFF_S = 60.0  # a file-started xds proxy is moved back to ADS at most this often
BOOTSTRAP = "envoy.yaml"

Validate = Callable[[ProxyFiles], None]  # raises EnvoyRejectedConfig (or ConfigError) when Envoy refuses them
MayPush = Callable[[], bool]  # asked right before each push: still the leader, no deploy running


# --- pure: what a host needs ---

@dataclass(frozen=True)
class HostPlan:
    """The proxies of one host to push now, and those left alone with why (not yet deployed, refused...)."""

    push: tuple[ProxySnapshot, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)  # proxy -> reason
    behind: bool = False  # some proxy does not run the snapshot (pushed now or not)


def pending_proxies(host: HostSpec, snapshot: Snapshot, state: HostState,
                    refused: Mapping[ProxyKey, str]) -> HostPlan:
    """Which of the host's proxies need files. A proxy whose identity the host does not list yet, or whose
    bootstrap on the host is not the spec's, is the deploy's (skipped); one whose snapshot version was refused
    is retried only once the snapshot changes."""
    push, skipped, behind = [], {}, False
    for proxy in host.proxies:
        wanted = snapshot.get((host.name, proxy.name))
        if wanted is None:
            continue
        on_host = state.files.get(proxy.name)
        if proxy.name not in state.identities or on_host is None:
            skipped[proxy.name], behind = "not deployed on the host yet", True
            continue
        if on_host.get(BOOTSTRAP) != wanted.bootstrap_sha256:
            skipped[proxy.name], behind = "its bootstrap on the host is not the spec's (the deploy's to write)", True
            continue
        if all(on_host.get(relpath) == digest for relpath, digest in wanted.on(on_host).items()):
            continue  # files the spec lacks are the deploy's (cleanup), not a reason to push
        behind = True
        if refused.get((host.name, proxy.name)) == wanted.version:
            skipped[proxy.name] = "refused before (retried when the snapshot changes)"
            continue
        push.append(wanted)
    return HostPlan(tuple(push), skipped, behind)


def bundle_of(wanted: ProxySnapshot, on_host: Mapping[str, str]) -> BundleProxy:
    """The bundle part moving the xds files the host lacks or has otherwise (only the controller's own, see
    ProxySnapshot.on). Nothing is deleted: a file the spec lacks is the deploy's to remove (mesh.cleanup)."""
    xds = wanted.xds
    digests = wanted.on(on_host)
    changed = [file.path for relpath, file in xds.items() if on_host.get(relpath) != digests[relpath]]
    return _bundle(wanted.files, tuple(changed), ())


@lru_cache(maxsize=256)
def _bundle(files: ProxyFiles, changed: tuple[str, ...], stale: tuple[str, ...]) -> BundleProxy:
    """bundle_for, once per distinct request: hosts with the same proxy files (a fan-out) share the work of
    rendering its validation config (a few ms each)."""
    return bundle_for(files, changed, stale)


# --- one host ---

class HostLink:
    """A persistent connection to one host and what its `state` said (kept current after each apply).
    Used by one thread at a time (the pusher runs one task per host)."""

    def __init__(self, spec: HostSpec, transport: Transport, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.transport = transport
        self.clock = clock
        self.session: CtlSession | None = None
        self.state: HostState | None = None
        self.state_at = float("-inf")
        self.failures = 0
        self.retry_at = float("-inf")
        self.log = structlog.get_logger().bind(host=spec.name)

    def ready(self) -> HostState | None:
        """The host's state: connects and runs `state` when unknown or old; None while it cannot be reached."""
        if self.state is not None and self.clock() - self.state_at < STATE_REFRESH_S:
            return self.state
        if self.clock() < self.retry_at:
            return None
        try:
            if self.session is None:
                self.session = self.transport.open(self.spec)
                self.log.info("host_connected", address=self.spec.address, after_failures=self.failures)
            self.refresh()
        except (TransportError, CtlProtocolError) as exc:
            self.drop(exc)
            return None
        self.failures = 0
        return self.state

    def refresh(self) -> None:
        """Run `state` again (after an apply that did not finish, the host's files are whatever it says)."""
        result = self.run(command("state"))
        if result.exit_code != 0:
            raise TransportError(f"mesh-ctl state exited {result.exit_code}: {_last_line(result.stderr)}")
        self.state, self.state_at = parse_state(result.stdout), self.clock()

    def run(self, line: str, stdin: bytes = b"") -> CtlResult:
        if self.session is None:
            raise TransportError(f"{self.spec.name}: not connected")
        try:
            return self.session.run(line, stdin)
        except TransportError as exc:
            self.drop(exc)
            raise

    def drop(self, reason: BaseException) -> None:
        """Forget the connection and the state; reconnect after a backoff."""
        if self.session is not None:
            try:
                self.session.close()
            except OSError:
                pass
        self.session, self.state = None, None
        self.failures += 1
        delay = backoff_s(self.failures)
        self.retry_at = self.clock() + delay
        if self.failures == 1 or self.failures % 10 == 0:
            self.log.warning("host_unreachable", error=str(reason), failures=self.failures, retry_in_s=round(delay, 2))

    def applied(self, wanted: ProxySnapshot) -> None:
        """The host now runs `wanted`'s xds files (its bootstrap as before)."""
        if self.state is None:
            return
        before = self.state.files.get(wanted.proxy, {})
        kept = {BOOTSTRAP: before[BOOTSTRAP]} if BOOTSTRAP in before else {}
        self.state.files[wanted.proxy] = {**kept, **wanted.on(before)}

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session, self.state = None, None


# --- every host ---

@dataclass(frozen=True)
class RoundResult:
    """One round over every host: pushes made (ok, refused, error), hosts behind after it."""

    pushed: int = 0
    refused: int = 0
    errors: int = 0
    behind: tuple[str, ...] = ()


@dataclass
class _HostOutcome:
    pushed: int = 0
    refused: int = 0
    errors: int = 0
    behind: bool = False


class Pusher:
    """Pushes snapshots to hosts. `round(snapshot, may_push, renew)` reaches every host in parallel."""

    def __init__(self, transport: Transport, validate: Validate, metrics: ControllerMetrics | None = None,
                 max_workers: int = MAX_WORKERS, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.transport = transport
        self.validate = validate
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.links: dict[str, HostLink] = {}
        self.refused: dict[ProxyKey, str] = {}  # the snapshot version each refused proxy was refused at
        self.pushed_at: dict[ProxyKey, float] = {}  # wall-clock time of each proxy's last push
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="push")
        self.validator = ThreadPoolExecutor(max_workers=4, thread_name_prefix="validate")
        self.validations: dict[str, Future[str | None]] = {}  # validation_key -> None (accepted) or refusal
        self.inflight: dict[str, Future[_HostOutcome]] = {}  # each host's running round
        self.behind: set[str] = set()
        self.lock = threading.Lock()
        self.log = structlog.get_logger()
        self.ads_up: Callable[[], bool] = lambda: False  # this controller serves ADS (the daemon sets it)
        self.restart_after: dict[ProxyKey, float] = {}  # a file-started xds proxy is restarted again after this

    def set_hosts(self, hosts: Iterable[HostSpec]) -> None:
        """The hosts of a (re-read) spec: a host whose connection data changed is reconnected; one gone closed."""
        wanted = {host.name: host for host in hosts}
        for name in list(self.links):
            link = self.links[name]
            if name not in wanted or _reach(wanted[name]) != _reach(link.spec):
                link.close()
                del self.links[name]
            else:
                link.spec = wanted[name]
        for name, host in wanted.items():
            self.links.setdefault(name, HostLink(host, self.transport, self.clock))

    def round(self, snapshot: Snapshot, may_push: MayPush, renew: Callable[[HostLink, MayPush], None] | None = None,
              wait_s: float | None = None) -> RoundResult:
        """Push `snapshot` to every host not busy with an earlier round, in parallel; wait for them (at most
        wait_s: a host still busy then finishes in the background and is skipped until it is done, so one slow
        host never holds back the others or the loop). Counts only the hosts that finished in time."""
        started = {}
        for name, link in self.links.items():
            busy = self.inflight.get(name)
            if busy is None or busy.done():
                started[name] = self.inflight[name] = self.executor.submit(self._host_round, link, snapshot,
                                                                           may_push, renew)
        done, _late = wait(list(started.values()), timeout=wait_s)
        outcomes = {name: future.result() for name, future in started.items() if future in done}
        for name in self.links:
            if name in outcomes:
                if outcomes[name].behind:
                    self.behind.add(name)
                else:
                    self.behind.discard(name)
            else:
                self.behind.add(name)  # still pushing: not there yet
        self.behind &= set(self.links)
        self._prune_validations(snapshot)
        if self.metrics is not None:
            self.metrics.hosts_behind.set(len(self.behind))
        return RoundResult(pushed=sum(o.pushed for o in outcomes.values()),
                           refused=sum(o.refused for o in outcomes.values()),
                           errors=sum(o.errors for o in outcomes.values()), behind=tuple(sorted(self.behind)))

    def _host_round(self, link: HostLink, snapshot: Snapshot, may_push: MayPush,
                    renew: Callable[[HostLink, MayPush], None] | None) -> _HostOutcome:
        outcome = _HostOutcome()
        try:
            state = link.ready()
            if state is None:
                outcome.behind = True
                return outcome
            plan = pending_proxies(link.spec, snapshot, state, self.refused)
            outcome.behind = plan.behind
            accepted = [wanted for wanted in plan.push if self._accepted(link.spec.name, wanted, outcome)]
            if accepted and may_push():
                self._apply(link, accepted, outcome)
                state = link.state
                if state is not None:
                    outcome.behind = pending_proxies(link.spec, snapshot, state, {}).behind
            if renew is not None and link.state is not None:
                renew(link, may_push)
            if self.ads_up() and link.state is not None and may_push():
                self._back_to_ads(link)
        except Exception as exc:  # a bug must not stop the other hosts or the loop
            self.log.exception("host_round_failed", host=link.spec.name, error=str(exc))
            outcome.errors += 1
            outcome.behind = True
        return outcome

    def _accepted(self, host: str, wanted: ProxySnapshot, outcome: _HostOutcome) -> bool:
        """Validated on the controller (once per distinct plan file set: ProxySnapshot.validation_key); a refusal
        is logged and remembered."""
        digest = wanted.validation_key
        with self.lock:
            future = self.validations.get(digest)
            if future is None:
                future = self.validator.submit(self._validation, wanted.files)
                self.validations[digest] = future
        refusal = future.result()
        if refusal is None:
            return True
        self.refused[(host, wanted.proxy)] = wanted.version
        outcome.refused += 1
        if self.metrics is not None:
            self.metrics.pushes.labels(result="refused").inc()
        self.log.error("push_refused", host=host, proxy=wanted.proxy, version=wanted.version, by="controller",
                       reason=refusal)
        return False

    def refusal(self, wanted: ProxySnapshot) -> str | None:
        """Envoy's refusal of `wanted`'s file set (None: accepted), validated once per validation key and shared
        with the pushes (the ADS server serves only what this accepts)."""
        with self.lock:
            future = self.validations.get(wanted.validation_key)
            if future is None:
                future = self.validator.submit(self._validation, wanted.files)
                self.validations[wanted.validation_key] = future
        return future.result()

    def _validation(self, files: ProxyFiles) -> str | None:
        try:
            self.validate(files)
        except (EnvoyRejectedConfig, ConfigError, MeshError) as exc:
            return str(exc)
        return None

    def _prune_validations(self, snapshot: Snapshot) -> None:
        keep = {wanted.validation_key for wanted in snapshot.values()}
        with self.lock:
            for digest in list(self.validations):
                if digest not in keep and self.validations[digest].done():
                    del self.validations[digest]

    def _apply(self, link: HostLink, wanted: list[ProxySnapshot], outcome: _HostOutcome) -> None:
        """One `apply` of the proxies' changed files; when it refuses several, each again alone, so one bad
        proxy holds back only itself."""
        state = link.state
        assert state is not None
        host = link.spec.name
        started = self.clock()
        try:
            bundle = apply_bundle([bundle_of(item, state.files.get(item.proxy, {})) for item in wanted])
            result = link.run(command("apply"), bundle)
            applied = set(parse_applied(result.stdout))
        except (TransportError, CtlProtocolError) as exc:
            self._count("error", started, outcome)
            self.log.warning("push_failed", host=host, proxies=[item.proxy for item in wanted], error=str(exc))
            if isinstance(exc, CtlProtocolError):
                link.drop(exc)
            return
        seconds = self.clock() - started
        done = [item for item in wanted if item.proxy in applied]
        for item in done:
            link.applied(item)
            self.pushed_at[(host, item.proxy)] = self.wall()
            self.refused.pop((host, item.proxy), None)
        if done:
            self._count("ok", started, outcome, pushed=len(done))
            self.log.info("pushed", host=host, proxies=[item.proxy for item in done],
                          version=",".join(item.version for item in done), duration_ms=round(seconds * 1000, 1))
        if result.exit_code == 0:
            return
        left = [item for item in wanted if item.proxy not in applied]
        try:
            link.refresh()  # the files of a proxy Envoy did not take in time may be half moved
        except (TransportError, CtlProtocolError) as exc:
            link.drop(exc)
            return
        state = link.state
        assert state is not None
        left = [item for item in left if state.resource_version(item.proxy) != item.version]
        if len(left) > 1 and result.exit_code == 1:
            for item in left:
                self._apply(link, [item], outcome)
            return
        for item in left:
            self.refused[(host, item.proxy)] = item.version
            self._count("refused", started, outcome)
            self.log.error("push_refused", host=host, proxy=item.proxy, version=item.version, by="host",
                           exit_code=result.exit_code, reason=_tail(result.stderr))

    def _back_to_ads(self, link: HostLink) -> None:
        """Restart (graceful drain first, by mesh-ctl) each xds proxy of the host that started from its files
        while no controller answered: its start step picks the ADS bootstrap now. At most once a
        RESTART_BACKOFF_S per proxy, so a proxy that cannot reach any controller is not restarted in a loop."""
        state = link.state
        assert state is not None
        restarted = False
        for proxy in link.spec.proxies:
            key = (link.spec.name, proxy.name)
            if proxy.delivery != "xds" or state.delivery.get(proxy.name) != "files" \
                    or self.clock() < self.restart_after.get(key, float("-inf")):
                continue
            self.restart_after[key] = self.clock() + RESTART_BACKOFF_S
            try:
                result = link.run(command("restart", proxy.name))
            except TransportError as exc:
                self.log.warning("xds_restart_failed", host=link.spec.name, proxy=proxy.name, error=str(exc))
                return
            restarted = True
            if result.exit_code == 0:
                self.log.info("xds_proxy_back_on_ads", host=link.spec.name, proxy=proxy.name,
                              reason="it had started from its files while no controller answered")
            else:
                self.log.warning("xds_restart_failed", host=link.spec.name, proxy=proxy.name,
                                 exit_code=result.exit_code, error=_tail(result.stderr))
        if restarted:
            try:
                link.refresh()
            except (TransportError, CtlProtocolError) as exc:
                link.drop(exc)

    def _count(self, result: str, started: float, outcome: _HostOutcome, pushed: int = 1) -> None:
        if result == "ok":
            outcome.pushed += pushed
        elif result == "refused":
            outcome.refused += 1
        else:
            outcome.errors += 1
        if self.metrics is not None:
            self.metrics.push_done(result, self.clock() - started)

    def wanted_versions(self, snapshot: Snapshot) -> dict[ProxyKey, str]:
        """Each proxy's resource version as the controller wants it on its host (ProxySnapshot.version_on what
        the host has, when known)."""
        found = {}
        for (host, proxy), wanted in snapshot.items():
            link = self.links.get(host)
            on_host = link.state.files.get(proxy) if link is not None and link.state is not None else None
            found[(host, proxy)] = wanted.version if on_host is None else wanted.version_on(on_host)
        return found

    def host_versions(self) -> dict[ProxyKey, str | None]:
        """The resource version each known proxy runs, as far as the controller knows (None: host unreached)."""
        found: dict[ProxyKey, str | None] = {}
        for name, link in self.links.items():
            for proxy in link.spec.proxies:
                state = link.state
                found[(name, proxy.name)] = None if state is None else state.resource_version(proxy.name)
        return found

    def reread(self) -> None:
        """Read every host's state again before its next push (a deploy may have changed its files and
        certificates meanwhile): the connections stay open."""
        for link in self.links.values():
            link.state_at = float("-inf")

    def forget(self) -> None:
        """Close every connection and forget what hosts have (another controller may push meanwhile)."""
        for link in self.links.values():
            link.close()
        self.refused.clear()

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.validator.shutdown(wait=False, cancel_futures=True)


def _reach(host: HostSpec) -> tuple[object, ...]:
    return host.address, host.port, host.user, host.known_hosts


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _tail(text: str, lines: int = 4) -> str:
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[:2000]
