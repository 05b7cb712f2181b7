"""The fleet's numbers: every proxy's Prometheus text scraped into a `FleetSnapshot` (scrape), and per edge
(source service -> destination service) and per service the request or connection rate, error rate and p99
latency between two snapshots (fleet_numbers, pure). `mesh top`, rollouts and the dashboard read them here.

It owns reading mesh's stat names and labels (design 3.3); it must not print.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from mesh.hosts.errors import HostUnreachable
from mesh.telemetry.scrape import Fetcher, FetchError
from mesh.telemetry.targets import ProxyTarget

# Stat families (Prometheus names, a counter's `_total` suffix dropped: prometheus-client's parser adds it).
CALLER_REQUESTS = "envoy_cluster_upstream_rq_xx"  # {source_service, source_version, destination_service, class}
CALLER_LATENCY = "envoy_cluster_upstream_rq_time"
CALLEE_REQUESTS = "envoy_http_downstream_rq_xx"  # {destination_service, destination_version, class}
CALLEE_LATENCY = "envoy_http_downstream_rq_time"
PER_SOURCE_REQUESTS = "envoy_vhost_vcluster_upstream_rq_xx"  # {source_service, destination_*, class}
PER_SOURCE_CODES = "envoy_vhost_vcluster_upstream_rq"  # the same per envoy_response_code, when no _xx family
PER_SOURCE_LATENCY = "envoy_vhost_vcluster_upstream_rq_time"
CONNECTIONS = "envoy_cluster_upstream_cx"  # upstream_cx_total, of the caller's cluster or the callee's app cluster
CONNECT_FAILURES = "envoy_cluster_upstream_cx_connect_fail"
CONNECTION_LENGTH = "envoy_cluster_upstream_cx_length_ms"

SOURCE, SOURCE_VERSION = "source_service", "source_version"
DESTINATION, DESTINATION_VERSION = "destination_service", "destination_version"
CLASS, CODE = "envoy_response_code_class", "envoy_response_code"
SCRAPE_WORKERS = 16


@dataclass(frozen=True)
class ProxyScrape:
    """One proxy's metrics at one time: its samples, or why they could not be read."""

    target: ProxyTarget
    at: float  # time.time() when the answer came
    samples: tuple[Sample, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class FleetSnapshot:
    proxies: tuple[ProxyScrape, ...]

    @property
    def failures(self) -> tuple[ProxyScrape, ...]:
        return tuple(scrape for scrape in self.proxies if scrape.error is not None)


def parse_metrics(text: str) -> tuple[Sample, ...]:
    """Every sample of a Prometheus text (ValueError when it is not one)."""
    return tuple(sample for family in text_string_to_metric_families(text) for sample in family.samples)


def scrape_one(target: ProxyTarget, fetcher: Fetcher) -> ProxyScrape:
    try:
        text = fetcher.fetch(target)
        samples = parse_metrics(text)
    except (FetchError, OSError, HostUnreachable) as exc:
        return ProxyScrape(target, time.time(), error=str(exc))
    except ValueError as exc:
        return ProxyScrape(target, time.time(), error=f"not Prometheus text: {exc}")
    return ProxyScrape(target, time.time(), samples)


def scrape(targets: Iterable[ProxyTarget], fetcher: Fetcher) -> FleetSnapshot:
    """Every target's metrics, read in parallel; a proxy that did not answer carries its error."""
    listed = list(targets)
    with ThreadPoolExecutor(max_workers=max(1, min(SCRAPE_WORKERS, len(listed)))) as pool:
        return FleetSnapshot(tuple(pool.map(lambda target: scrape_one(target, fetcher), listed)))


# ---- the numbers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Numbers:
    """Requests (HTTP) or connections (TCP) per second; the share of them that failed (5xx, or TCP connect
    failures), None without any; p99 latency in ms (TCP: connection length), None without any measured."""

    rate: float
    error_rate: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class EdgeNumbers:
    """Calls from one service to another, measured by the callers' proxies; per source version likewise, per
    destination version by the callees' proxies (HTTP only: a TCP connection names no caller there)."""

    source: str
    destination: str
    protocol: str
    numbers: Numbers
    by_source_version: Mapping[str, Numbers] = field(default_factory=dict)
    by_destination_version: Mapping[str, Numbers] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceNumbers:
    """Everything a service's proxies received, in total and per version."""

    service: str
    protocol: str
    numbers: Numbers
    by_version: Mapping[str, Numbers] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetNumbers:
    interval: float  # seconds between the two snapshots (the mean over the proxies read in both)
    services: tuple[ServiceNumbers, ...]
    edges: tuple[EdgeNumbers, ...]
    failures: tuple[ProxyScrape, ...]  # proxies missing from either snapshot, with the latest error


@dataclass
class _Tally:
    rate: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))

    def numbers(self) -> Numbers:
        """No p99 without requests: Envoy publishes histograms at its stats flush (every 5 s), so buckets may
        still move in an interval after the requests ended."""
        if self.rate <= 0:
            return Numbers(self.rate, None, None)
        return Numbers(self.rate, self.errors / self.rate, p99(self.buckets))


def p99(buckets: Mapping[float, float], quantile: float = 0.99) -> float | None:
    """The quantile of cumulative bucket counts (upper bound -> count), interpolated inside its bucket as
    Prometheus's histogram_quantile does; the highest finite bound when it falls in +Inf; None with no count."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = quantile * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return bound if inside <= 0 else lower + (bound - lower) * (rank - below) / inside
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class _Delta:
    name: str  # without a counter's _total
    labels: Mapping[str, str]
    value: float  # per second for counters, a count for buckets
    le: float | None = None


def _key(sample: Sample) -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample.name, tuple(sorted(sample.labels.items()))


def _deltas(before: ProxyScrape, after: ProxyScrape) -> list[_Delta]:
    interval = after.at - before.at
    if interval <= 0:
        return []
    earlier = {_key(sample): sample.value for sample in before.samples}
    found = []
    for sample in after.samples:
        old = earlier.get(_key(sample), 0.0)
        change = sample.value - old if sample.value >= old else sample.value  # a restarted Envoy counts anew
        labels = dict(sample.labels)
        if sample.name.endswith("_bucket") and "le" in labels:
            le = float(labels.pop("le"))
            found.append(_Delta(sample.name[:-len("_bucket")], labels, change, le))
        elif sample.name.endswith("_total"):
            found.append(_Delta(sample.name[:-len("_total")], labels, change / interval))
    return found


def _is_error(labels: Mapping[str, str]) -> bool:
    if CLASS in labels:
        return labels[CLASS] == "5"
    return labels.get(CODE, "").startswith("5")


class _Versions:
    """A version as the inventory writes it, from a stat label (where '.' became '_')."""

    def __init__(self, targets: Iterable[ProxyTarget]) -> None:
        self._known = {(target.service, target.version.replace(".", "_")): target.version for target in targets}

    def __call__(self, service: str, label: str) -> str:
        return self._known.get((service, label), label)


def fleet_numbers(before: FleetSnapshot, after: FleetSnapshot) -> FleetNumbers:
    """Per edge and per service, what happened between two snapshots. Pure."""
    earlier = {(scrape.target.host, scrape.target.proxy): scrape for scrape in before.proxies
               if scrape.error is None}
    pairs = [(earlier[(scrape.target.host, scrape.target.proxy)], scrape) for scrape in after.proxies
             if scrape.error is None and (scrape.target.host, scrape.target.proxy) in earlier]
    read = {(pair[1].target.host, pair[1].target.proxy) for pair in pairs}
    failed: dict[tuple[str, str], ProxyScrape] = {}
    for scrape in (*before.proxies, *after.proxies):  # the latest error of a proxy wins
        if (scrape.target.host, scrape.target.proxy) not in read and scrape.error is not None:
            failed[(scrape.target.host, scrape.target.proxy)] = scrape
    protocols = {scrape.target.service: scrape.target.protocol for scrape in (*before.proxies, *after.proxies)}
    version = _Versions(scrape.target for scrape in (*before.proxies, *after.proxies))
    deltas = [delta for pair in pairs for delta in _deltas(*pair)]
    intervals = [pair[1].at - pair[0].at for pair in pairs]
    return FleetNumbers(interval=sum(intervals) / len(intervals) if intervals else 0.0,
                        services=_services(deltas, protocols, version), edges=_edges(deltas, protocols, version),
                        failures=tuple(failed.values()))


def _edges(deltas: list[_Delta], protocols: Mapping[str, str], version: _Versions) -> tuple[EdgeNumbers, ...]:
    total: dict[tuple[str, str], _Tally] = defaultdict(_Tally)
    by_source: dict[tuple[str, str], dict[str, _Tally]] = defaultdict(lambda: defaultdict(_Tally))
    by_destination: dict[tuple[str, str], dict[str, _Tally]] = defaultdict(lambda: defaultdict(_Tally))
    services = set(protocols)
    protocols = {**_seen_protocols(deltas), **protocols}
    for delta in deltas:
        labels = delta.labels
        if SOURCE not in labels or DESTINATION not in labels:
            continue
        edge = (labels[SOURCE], labels[DESTINATION])
        tcp = protocols.get(edge[1]) == "tcp"
        if SOURCE_VERSION in labels:  # the caller's own cluster
            tallies = (total[edge], by_source[edge][version(edge[0], labels[SOURCE_VERSION])])
            _count(delta, tallies, CONNECTIONS if tcp else CALLER_REQUESTS, CONNECT_FAILURES if tcp else None,
                   CONNECTION_LENGTH if tcp else CALLER_LATENCY)
        elif DESTINATION_VERSION in labels and not tcp:  # the callee's virtual cluster of this caller (its
            # catch-all `other`, requests no mesh service's certificate made, is an edge only from a known service)
            tally = by_destination[edge][version(edge[1], labels[DESTINATION_VERSION])]
            _count(delta, (tally,), PER_SOURCE_REQUESTS, None, PER_SOURCE_LATENCY)
    for edge, versions in by_destination.items():  # per code only when Envoy gave no _xx family
        if all(tally.rate == 0 for tally in versions.values()):
            for delta in deltas:
                if delta.name == PER_SOURCE_CODES and CODE in delta.labels and _edge_of(delta) == edge:
                    tally = versions[version(edge[1], delta.labels.get(DESTINATION_VERSION, ""))]
                    tally.rate += delta.value
                    tally.errors += delta.value if _is_error(delta.labels) else 0.0
    return tuple(EdgeNumbers(edge[0], edge[1], protocols.get(edge[1], "http"), total[edge].numbers(),
                             _numbers(by_source.get(edge, {})), _numbers(by_destination.get(edge, {})))
                 for edge in sorted(set(total) | {edge for edge in by_destination if edge[0] in services}))


def _seen_protocols(deltas: list[_Delta]) -> dict[str, str]:
    """The protocol of services no proxy of which was read: http when callers count requests to it, else tcp."""
    seen: dict[str, str] = {}
    for delta in deltas:
        if SOURCE_VERSION in delta.labels and DESTINATION in delta.labels:
            http = delta.name in (CALLER_REQUESTS, CALLER_LATENCY)
            if http or delta.labels[DESTINATION] not in seen:
                seen[delta.labels[DESTINATION]] = "http" if http else "tcp"
    return seen


def _edge_of(delta: _Delta) -> tuple[str, str]:
    return delta.labels.get(SOURCE, ""), delta.labels.get(DESTINATION, "")


def _services(deltas: list[_Delta], protocols: Mapping[str, str],
              version: _Versions) -> tuple[ServiceNumbers, ...]:
    total: dict[str, _Tally] = {service: _Tally() for service in protocols}
    by_version: dict[str, dict[str, _Tally]] = defaultdict(lambda: defaultdict(_Tally))
    for delta in deltas:
        labels = delta.labels
        if SOURCE in labels or DESTINATION not in labels or DESTINATION_VERSION not in labels:
            continue
        service = labels[DESTINATION]
        tcp = protocols.get(service) == "tcp"
        tallies = (total.setdefault(service, _Tally()),
                   by_version[service][version(service, labels[DESTINATION_VERSION])])
        _count(delta, tallies, CONNECTIONS if tcp else CALLEE_REQUESTS, CONNECT_FAILURES if tcp else None,
               CONNECTION_LENGTH if tcp else CALLEE_LATENCY)
    return tuple(ServiceNumbers(service, protocols.get(service, "http"), total[service].numbers(),
                                _numbers(by_version.get(service, {})))
                 for service in sorted(total))


def _count(delta: _Delta, tallies: tuple[_Tally, ...], requests: str, failures: str | None, latency: str) -> None:
    for tally in tallies:
        if delta.le is not None:
            if delta.name == latency:
                tally.buckets[delta.le] += delta.value
        elif delta.name == requests:
            tally.rate += delta.value
            if failures is None and _is_error(delta.labels):
                tally.errors += delta.value
        elif failures is not None and delta.name == failures:
            tally.errors += delta.value


def _numbers(tallies: Mapping[str, _Tally]) -> dict[str, Numbers]:
    return {name: tallies[name].numbers() for name in sorted(tallies)}
