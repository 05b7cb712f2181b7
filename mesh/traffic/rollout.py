"""`mesh rollout SVC --to V`: move traffic to version V step by step (`--steps 10,25,50,100`), each step through
a run-time split the controllers apply, then watch V's numbers as its own proxies count them (fleet_numbers'
per-version numbers: requests, 5xx share, p99) for an interval, and promote, wait or roll back by itself.

The decision is `decide` (pure); the splits are `step_split` (pure); `run_rollout` drives them over a
TrafficStore and a Meter, so tests give it fakes. Rolling back puts the split where it started; Ctrl-C leaves the
last split every caller applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, Protocol

from mesh.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, MeshError, UsageError
from mesh.inventory.model import Mesh
from mesh.inventory.policy import TrafficOverride, apply_override
from mesh.suggest import did_you_mean
from mesh.traffic.changes import TrafficTarget, WaitResult, checked, new_revision, update, wait_applied
from mesh.traffic.kv import StoredOverride, TrafficStore, usable_problems
from mesh.traffic.options import Split, split_text

Decision = Literal["promote", "wait", "rollback"]
DECISION_WORDS: Mapping[Decision, str] = {"promote": "promote", "wait": "wait", "rollback": "roll back"}


@dataclass(frozen=True)
class Limits:
    """What a step must show before the next: at most max_error_rate (a fraction) of 5xx and a p99 of at most
    max_p99_ms (None: latency not judged) over at least min_requests requests; with fewer, up to
    extra_intervals more intervals are watched."""

    max_error_rate: float
    max_p99_ms: float | None
    min_requests: int
    extra_intervals: int = 3


@dataclass(frozen=True)
class Observation:
    """The new version's numbers since its step was applied."""

    requests: float
    error_rate: float | None  # a fraction; None without requests
    p99_ms: float | None  # None: no latency published yet (Envoy every 5 s)
    seconds: float
    intervals: int  # intervals watched in this step so far (1 after the first)
    unanswered: int = 0  # proxies whose metrics could not be read


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str


def _share(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _limit_share(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def decide(version: str, seen: Observation, limits: Limits) -> Verdict:
    """Roll back when the error rate or the p99 exceed the limits over at least min_requests requests; with
    fewer requests (or no p99 yet) wait while extra intervals remain, then roll back; promote otherwise. Pure."""
    more = seen.intervals <= limits.extra_intervals
    requests = round(seen.requests)
    if requests < limits.min_requests:
        if more:
            return Verdict("wait", f"{requests} requests, fewer than {limits.min_requests}: another interval "
                                   f"({seen.intervals} of {limits.extra_intervals} more)")
        return Verdict("rollback", f"not enough traffic: {requests} requests to {version} in {seen.seconds:.0f} s, "
                                   f"fewer than {limits.min_requests}")
    if seen.error_rate is not None and seen.error_rate > limits.max_error_rate:
        return Verdict("rollback", f"{version} error rate {_share(seen.error_rate)} > "
                                   f"{_limit_share(limits.max_error_rate)}")
    if limits.max_p99_ms is not None:
        if seen.p99_ms is None:
            if more:
                return Verdict("wait", f"no p99 published yet: another interval ({seen.intervals} of "
                                       f"{limits.extra_intervals} more)")
            return Verdict("rollback", f"no p99 latency of {version} measured in {seen.seconds:.0f} s")
        if seen.p99_ms > limits.max_p99_ms:
            return Verdict("rollback", f"{version} p99 {_ms(seen.p99_ms)} > {_ms(limits.max_p99_ms)}")
    return Verdict("promote", "within the limits")


# ---- the splits --------------------------------------------------------------------------------------------


def effective_split(mesh: Mesh, service: str, stored: StoredOverride | None) -> Split | None:
    """The catch-all route's split now (the override's, else the inventory's last route without a match);
    None when every instance takes requests (no split)."""
    override = None
    if stored is not None and not usable_problems(stored, mesh):
        override = stored.override
    policy = apply_override(mesh.policy(service), override)
    if policy.routes and policy.routes[-1].match is None and policy.routes[-1].to:
        return policy.routes[-1].to
    return None


def serving_shares(start: Split | None, to: str, instances: Mapping[str, int]) -> dict[str, float]:
    """The versions other than `to` that take requests now, with their weights (without a split: their numbers
    of instances, as round robin over every instance shares them). Pure."""
    if start is not None:
        return {version: float(weight) for version, weight in start if version != to and weight > 0}
    return {version: float(count) for version, count in instances.items() if version != to and count > 0}


def step_split(versions: tuple[str, ...], serving: Mapping[str, float], to: str, share: int) -> Split:
    """The weights at a step: `to` gets `share`, the rest goes to the serving versions in proportion (largest
    remainders, ties by name); in `versions` order, versions left with 0 not named (they get no request). Pure."""
    rest = 100 - share
    total = sum(serving.values())
    exact = {version: rest * weight / total for version, weight in serving.items()} if total > 0 else {}
    weights = {version: int(value) for version, value in exact.items()}
    left = rest - sum(weights.values())
    for version in sorted(exact, key=lambda name: (-(exact[name] - weights[name]), name))[:left]:
        weights[version] += 1
    weights[to] = share
    return tuple((version, weights[version]) for version in versions if weights.get(version, 0) > 0)


# ---- the numbers -------------------------------------------------------------------------------------------


class Meter(Protocol):
    """The new version's numbers: `mark()` now, `since(mark, intervals)` what happened after it."""

    def mark(self) -> Any: ...

    def since(self, mark: Any, intervals: int) -> Observation: ...


@dataclass
class FleetMeter:
    """A service version's numbers as its own proxies count them, read from their metrics ports (as `mesh top`
    reads them: through a controller, else directly)."""

    targets: tuple[Any, ...]  # mesh.telemetry.targets.ProxyTarget of the service's proxies
    fetcher: Any  # mesh.telemetry.scrape.Fetcher
    service: str
    version: str

    def mark(self) -> Any:
        from mesh.telemetry.fleet import scrape

        return scrape(self.targets, self.fetcher)

    def since(self, mark: Any, intervals: int) -> Observation:
        from mesh.telemetry.fleet import fleet_numbers, scrape

        numbers = fleet_numbers(mark, scrape(self.targets, self.fetcher))
        found = next((item for item in numbers.services if item.service == self.service), None)
        counted = found.by_version.get(self.version) if found is not None else None
        if counted is None:
            return Observation(0.0, None, None, numbers.interval, intervals, len(numbers.failures))
        return Observation(counted.rate * numbers.interval, counted.error_rate, counted.p99_ms, numbers.interval,
                           intervals, len(numbers.failures))


# ---- the rollout -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutPlan:
    target: TrafficTarget
    to: str
    steps: tuple[int, ...]
    interval_s: float
    limits: Limits
    start: Split | None  # the effective split before the rollout (None: every instance)
    start_override: Split | None  # the override's split before it (what a roll back stores again)
    serving: Mapping[str, float] = field(default_factory=dict)
    apply_timeout_s: float = 60.0

    def split(self, share: int) -> Split:
        return step_split(self.target.versions, self.serving, self.to, share)


def plan_rollout(mesh: Mesh, target: TrafficTarget, to: str, stored: StoredOverride | None, steps: tuple[int, ...],
                 interval_s: float, limits: Limits, apply_timeout_s: float) -> RolloutPlan:
    """The rollout's plan from the inventory and the stored override; a UsageError (exit 5) when the service is
    not HTTP or has no caller, `to` is not one of its versions, or nothing else serves."""
    check_rollout_target(target, to)
    start = effective_split(mesh, target.service, stored)
    instances = {version: sum(1 for workload in mesh.services[target.service] if workload.version == version)
                 for version in target.versions}
    serving = serving_shares(start, to, instances)
    if not serving:
        raise UsageError(f"{to} already takes every request of {target.service} ({split_text(start or ())})",
                         f"`mesh route show {target.service}`")
    current = stored.override if stored is not None and stored.override is not None else None
    return RolloutPlan(target, to, steps, interval_s, limits, start, current.split if current else None,
                       serving, apply_timeout_s)


def check_rollout_target(target: TrafficTarget, to: str) -> None:
    """A UsageError (exit 5) when the inventory alone rules the rollout out: checked before Consul is asked."""
    if target.protocol == "tcp":
        raise UsageError(f"{target.service} is a TCP service: a rollout splits HTTP requests between versions")
    if to not in target.versions:
        raise UsageError(f"{target.service} has no version {to!r} (its versions: {', '.join(target.versions)})",
                         did_you_mean(to, target.versions))
    if not target.callers:
        raise UsageError(f"no service calls {target.service}: there is no traffic to move")
    if len(target.versions) < 2:
        raise UsageError(f"{target.service} runs one version only ({to}): there is nothing to roll out from")


@dataclass(frozen=True)
class _Progress:
    """The last split every caller applied (`applied`, as the rollout shows it; `stored`: the override's split
    that gives it), and a split written but not applied yet."""

    applied: Split | None
    stored: Split | None
    pending: Split | None = None
    pending_stored: Split | None = None
    pending_revision: str | None = None  # None: nothing pending


class Rollout:
    """Runs a RolloutPlan: prints a line per step and decision on `out`, the final error on `err`."""

    def __init__(self, plan: RolloutPlan, store: TrafficStore, meter: Meter, out: Callable[[str], None],
                 err: Callable[[str], None], who: str, now: Callable[[], datetime],
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan, self.store, self.meter = plan, store, meter
        self.out, self.err, self.who, self.now, self.sleep, self.clock = out, err, who, now, sleep, clock
        self.progress = _Progress(plan.start, plan.start_override)

    def run(self) -> int:
        """Every step, or a roll back (exit 1), or Ctrl-C (exit 99); 0 once the last step was promoted."""
        plan = self.plan
        limits = plan.limits
        p99 = f", p99 <= {_ms(limits.max_p99_ms)}" if limits.max_p99_ms is not None else ""
        self.out(f"rollout of {plan.target.service} to {plan.to}: steps {', '.join(map(str, plan.steps))}, "
                 f"{plan.interval_s:g} s each; limits: error rate <= {_limit_share(limits.max_error_rate)}{p99}, "
                 f"at least {limits.min_requests} requests")
        self.out(f"start: {split_words(plan.start)}")
        try:
            return self._steps()
        except KeyboardInterrupt:
            return self._interrupted()

    def _steps(self) -> int:
        plan = self.plan
        count = len(plan.steps)
        for number, share in enumerate(plan.steps, 1):
            label = f"step {number}/{count}"
            split = plan.split(share)
            waited = self._apply(split, split)
            if not waited.applied:
                why = waited.why_not(plan.target.service, self.progress.pending_revision or "")
                self.out(f"{label}  {split_text(split)}  not applied within {plan.apply_timeout_s:g} s: {why}")
                return self._roll_back(label, split, f"{split_text(split)} not applied: {why}")
            self.out(f"{label}  {split_text(split)}  applied in {waited.seconds:.1f} s")
            verdict = self._watch(label)
            if verdict.decision == "rollback":
                return self._roll_back(label, split, verdict.reason)
        self.out(f"rollout of {plan.target.service} to {plan.to} done: {split_words(self.progress.applied)}")
        return EXIT_OK

    def _apply(self, shown: Split | None, stored: Split | None) -> WaitResult:
        """Store the override's split `stored` (None: no split), keeping the stored fault, and wait until every
        caller applied it; `shown` is the effective split that gives."""
        service = self.plan.target.service
        self.progress = replace(self.progress, pending=shown, pending_stored=stored, pending_revision="")
        written = self._store(stored, check=True)
        self.progress = replace(self.progress, pending_revision=written)
        waited = wait_applied(self.store, service, written, self.plan.apply_timeout_s, self.sleep, self.clock)
        if waited.applied:
            self.progress = _Progress(shown, stored)
        return waited

    def _store(self, split: Split | None, check: bool) -> str:
        """Write the split (keeping the stored fault); the revision callers will reflect ("" = no override)."""
        target = self.plan.target

        def make(current: TrafficOverride | None) -> TrafficOverride | None:
            fault = current.fault if current is not None else None
            if split is None and fault is None:
                return None
            override = TrafficOverride(split=split, fault=fault, revision=new_revision())
            return checked(target, override) if check else override

        return update(self.store, target.service, make, self.who, self.now).revision

    def _watch(self, label: str) -> Verdict:
        plan = self.plan
        mark = self.meter.mark()
        intervals = 0
        while True:
            self.sleep(plan.interval_s)
            intervals += 1
            seen = self.meter.since(mark, intervals)
            verdict = decide(plan.to, seen, plan.limits)
            self.out(f"{label}  {plan.to}: {numbers_text(seen)}  -> {DECISION_WORDS[verdict.decision]}"
                     + (f": {verdict.reason}" if verdict.decision != "promote" else ""))
            if verdict.decision != "wait":
                return verdict

    def _roll_back(self, label: str, split: Split, reason: str) -> int:
        plan = self.plan
        waited = self._apply(plan.start, plan.start_override)
        back = split_words(plan.start)
        if waited.applied:
            self.out(f"rolled back to {back}: applied in {waited.seconds:.1f} s")
        else:
            self.out(f"rolled back to {back}: stored, not applied within {plan.apply_timeout_s:g} s: "
                     f"{waited.why_not(plan.target.service, self.progress.pending_revision or '')}")
        self.err(f"ERROR: rollout of {plan.target.service} to {plan.to} rolled back at {label} "
                 f"({split_text(split)}): {reason}")
        return EXIT_ERROR

    def _interrupted(self) -> int:
        """Ctrl-C: the last split every caller applied stays; one written but not applied yet is put back."""
        progress = self.progress
        service = self.plan.target.service
        if progress.pending_revision is not None:
            try:
                if progress.pending_revision and self.store.applied().revision(service) == progress.pending_revision:
                    progress = _Progress(progress.pending, progress.pending_stored)
                else:
                    self._store(progress.stored, check=False)
            except MeshError as exc:
                self.err(f"ERROR: could not put back {split_words(progress.applied)}: {exc}")
        self.err(f"interrupted: {service} stays at {split_words(progress.applied)}, the last split every caller "
                 f"applied (`mesh route set {service} ...` or `mesh route reset {service}` changes it)")
        return EXIT_INTERRUPTED


def split_words(split: Split | None) -> str:
    return split_text(split) if split is not None else "every instance (no split)"


def numbers_text(seen: Observation) -> str:
    """`412 requests in 60 s, errors 0.2%, p99 45 ms` (and the proxies that did not answer)."""
    errors = _share(seen.error_rate) if seen.error_rate is not None else "-"
    p99 = _ms(seen.p99_ms) if seen.p99_ms is not None else "-"
    text = f"{round(seen.requests)} requests in {seen.seconds:.0f} s, errors {errors}, p99 {p99}"
    if seen.unanswered:
        text += f" ({seen.unanswered} proxies did not answer)"
    return text
