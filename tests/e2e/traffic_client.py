#!/usr/bin/env python3
"""A load client the traffic tests copy into a lab node and run there: N HTTP requests (or a duration) to one
URL from C threads, each thread on its own keep-alive connection, then one JSON document on stdout with what came
back: counts by status, by the answering instance (the first hop of the demo app's answer, "service/version/
instance"), by status and instance, by every hop ("service" -> "instance" -> count, e.g. which db answered),
every answer's chain ("api/vm2 db/vm1": who answered at each hop), latencies (ms) and transport errors. Optional: headers, a cookie, a method, request ids with a prefix, and the
samples themselves (status, instance, latency).

Standard library only (the lab's nodes have python3 and nothing else); never imports mesh.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="send requests, print JSON counts of who answered what")
    parser.add_argument("url")
    parser.add_argument("-n", "--requests", type=int, default=100, help="how many (default 100)")
    parser.add_argument("--duration", type=float, help="send for this many seconds instead of -n requests")
    parser.add_argument("-c", "--concurrency", type=int, default=4)
    parser.add_argument("-X", "--method", default="GET")
    parser.add_argument("-H", "--header", action="append", default=[], metavar="NAME:VALUE")
    parser.add_argument("--header-cycle", metavar="NAME:V1,V2,...",
                        help="request i carries NAME with value i modulo the list (e.g. ring hash keys)")
    parser.add_argument("--request-id-prefix", help="x-request-id: PREFIX-<i> on request i")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds each thread waits between requests")
    parser.add_argument("--samples", action="store_true", help="also list [status, instance, ms, key] per request")
    parser.add_argument("--stop-file", help="stop (instead of after -n requests) once this file exists")
    return parser.parse_args(argv)


class Totals:
    """What every thread saw, merged under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: Counter[str] = Counter()
        self.instance: Counter[str] = Counter()
        self.status_instance: Counter[str] = Counter()
        self.hops: dict[str, Counter[str]] = {}
        self.chains: Counter[str] = Counter()
        self.key_instance: dict[str, Counter[str]] = {}
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.samples: list[list[Any]] = []

    def add(self, status: str, body: bytes, took_ms: float, key: str | None, keep: bool) -> None:
        instance, hops = describe(body)
        with self.lock:
            self.status[status] += 1
            self.instance[instance] += 1
            self.status_instance[f"{status} {instance}"] += 1
            self.latencies.append(took_ms)
            for service, name in hops:
                self.hops.setdefault(service, Counter())[name] += 1
            self.chains[" ".join(f"{service}/{name}" for service, name in hops) or "-"] += 1
            if key is not None:
                self.key_instance.setdefault(key, Counter())[instance] += 1
            if keep:
                self.samples.append([status, instance, round(took_ms, 1), key])


def describe(body: bytes) -> tuple[str, list[tuple[str, str]]]:
    """("service/version/instance" of the first hop, or "-"; [(service, instance or "error")] of every hop)."""
    try:
        hops = json.loads(body).get("hops")
    except (ValueError, AttributeError):
        return "-", []
    if not isinstance(hops, list) or not hops or not isinstance(hops[0], dict):
        return "-", []
    found = []
    for hop in hops:
        if isinstance(hop, dict):
            found.append((str(hop.get("service")), "error" if "error" in hop else str(hop.get("instance"))))
    first = hops[0]
    return f"{first.get('service')}/{first.get('version')}/{first.get('instance')}", found


def run(args: argparse.Namespace) -> dict[str, Any]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = dict(item.split(":", 1) for item in args.header)
    headers = {name.strip(): value.strip() for name, value in headers.items()}
    cycle_name, cycle_values = None, [""]
    if args.header_cycle:
        cycle_name, _, values = args.header_cycle.partition(":")
        cycle_values = values.split(",")
    totals = Totals()
    counter = iter(range(sys.maxsize))
    counter_lock = threading.Lock()
    deadline = time.monotonic() + args.duration if args.duration else None

    def next_index() -> int | None:
        with counter_lock:
            index = next(counter)
        if deadline is not None:
            return index if time.monotonic() < deadline else None
        if args.stop_file:
            return None if os.path.exists(args.stop_file) else index
        return index if index < args.requests else None

    def worker() -> None:
        connection: http.client.HTTPConnection | None = None
        while (index := next_index()) is not None:
            request_headers = dict(headers)
            key = None
            if cycle_name:
                key = cycle_values[index % len(cycle_values)]
                request_headers[cycle_name] = key
            if args.request_id_prefix:
                request_headers["x-request-id"] = f"{args.request_id_prefix}-{index}"
            started = time.monotonic()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(host, port, timeout=args.timeout)
                connection.request(args.method, path, headers=request_headers)
                response = connection.getresponse()
                body = response.read()
                took = (time.monotonic() - started) * 1000
                totals.add(str(response.status), body, took, key, args.samples)
                if response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                with totals.lock:
                    totals.errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
                if connection is not None:
                    connection.close()
                connection = None
            if args.pause:
                time.sleep(args.pause)
        if connection is not None:
            connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    latencies = sorted(totals.latencies)

    def quantile(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

    report: dict[str, Any] = {
        "sent": len(latencies) + sum(totals.errors.values()),
        "answered": len(latencies),
        "seconds": round(seconds, 2),
        "status": dict(totals.status),
        "instance": dict(totals.instance),
        "status_instance": dict(totals.status_instance),
        "hops": {service: dict(counts) for service, counts in totals.hops.items()},
        "chains": dict(totals.chains),
        "key_instance": {key: dict(counts) for key, counts in totals.key_instance.items()},
        "latency_ms": {"min": quantile(0), "p50": quantile(0.5), "p99": quantile(0.99), "max": quantile(1.0)},
        "errors": dict(totals.errors),
    }
    if args.samples:
        report["samples"] = totals.samples
    return report


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
