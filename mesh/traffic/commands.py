"""`mesh route show/set/reset`, `mesh fault set/reset` and `mesh rollout`: thin click commands over
mesh.traffic. They parse options (bad ones exit 5), load the inventory, read or change the override in Consul,
wait for the controllers and print what they did; exit 0 done, 1 not applied in time (or rolled back).

`STORE` and `METER` make the Consul store and the fleet's numbers; tests replace them with fakes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import click

from mesh.cli_inventory import fleet_inventory, inventory_option
from mesh.drain import operator
from mesh.errors import EXIT_ERROR, EXIT_OK, UsageError
from mesh.inventory.model import Mesh
from mesh.inventory.policy import TrafficOverride
from mesh.runtime_kv import not_applied_text
from mesh.traffic import changes, options
from mesh.traffic.changes import Make, TrafficTarget, Unchanged, Written, traffic_target, update, wait_applied
from mesh.traffic.kv import ConsulTraffic, TrafficStore
from mesh.traffic.rollout import FleetMeter, Limits, Meter, Rollout, check_rollout_target, plan_rollout
from mesh.traffic.view import fault_text, route_view, show_json, show_text

MAX_WAIT_S = 3600.0


def _consul_store(mesh: Mesh) -> TrafficStore:
    return ConsulTraffic.of(mesh)


def _fleet_meter(mesh: Mesh, service: str, version: str) -> Meter:
    from mesh.telemetry.scrape import fetcher_for
    from mesh.telemetry.targets import proxy_targets

    targets = tuple(target for target in proxy_targets(mesh) if target.service == service)
    return FleetMeter(targets, fetcher_for(mesh), service, version)


STORE: Callable[[Mesh], TrafficStore] = _consul_store
METER: Callable[[Mesh, str, str], Meter] = _fleet_meter


def load_mesh(inventory_option: str | None) -> Mesh:
    from mesh.inventory.check import check_inventory
    from mesh.inventory.loader import load_inventory

    path = fleet_inventory(None, inventory_option)
    return check_inventory(load_inventory(path), path).mesh


def _now() -> datetime:
    return datetime.now(UTC)


def _err(text: str) -> None:
    click.echo(text, err=True)


wait_option = click.option("--wait", "wait_text", default="60", show_default=True, metavar="SECONDS",
                           help="Wait at most this long (seconds, or 90s, 2m) for every caller to apply it.")
no_wait_option = click.option("--no-wait", is_flag=True, help="Store it and return without waiting.")


@click.group("route")
def route() -> None:
    """Show or change a service's routing at run time (an override in Consul KV that wins over the inventory's
    mesh_services until reset; the active controller applies it to every caller's Envoy without a restart)."""


@route.command("show")
@click.argument("service")
@inventory_option
@click.option("--json", "as_json", is_flag=True, help="Print the routing as JSON (keys: README, Run-time "
              "traffic changes).")
def route_show(service: str, inventory_option: str | None, as_json: bool) -> None:
    """SERVICE's effective routing: each route in order (match, versions and shares, timeout, retries), mirror,
    fault, load balancing, where each value comes from (inventory, override, default), the stored override and
    whether the controller applied it."""
    mesh = load_mesh(inventory_option)
    traffic_target(mesh, service)
    store = STORE(mesh)
    view = route_view(mesh, service, store.read(service), store.applied())
    if as_json:
        click.echo(json.dumps(show_json(view), indent=2 if sys.stdout.isatty() else None))
    else:
        click.echo(show_text(view), nl=False)


@route.command("set")
@click.argument("service")
@click.argument("weights", nargs=-1, metavar="VERSION=WEIGHT...")
@inventory_option
@wait_option
@no_wait_option
@click.pass_context
def route_set(ctx: click.Context, service: str, weights: tuple[str, ...], inventory_option: str | None,
              wait_text: str, no_wait: bool) -> None:
    """Split SERVICE's requests between its versions: `mesh route set api v1=90 v2=10` (whole percentages
    summing to 100). It replaces the split of the catch-all route (the inventory's last route without a match;
    added after the others when there is none); a run-time fault stays. Waits until every caller applied it:
    exit 1 when that does not happen in time (the override stays stored)."""
    split = options.parse_split(weights)
    timeout = options.parse_seconds(wait_text, "--wait", MAX_WAIT_S)
    mesh = load_mesh(inventory_option)
    target = traffic_target(mesh, service)
    changes.checked(target, TrafficOverride(split=split))  # refused (exit 5) before Consul is asked
    ctx.exit(_change(mesh, target, changes.with_split(target, split), None if no_wait else timeout))


@route.command("reset")
@click.argument("service")
@inventory_option
@wait_option
@no_wait_option
@click.pass_context
def route_reset(ctx: click.Context, service: str, inventory_option: str | None, wait_text: str,
                no_wait: bool) -> None:
    """Remove SERVICE's run-time override (split and fault): its routing is the inventory's again."""
    timeout = options.parse_seconds(wait_text, "--wait", MAX_WAIT_S)
    mesh = load_mesh(inventory_option)
    try:
        target = traffic_target(mesh, service)
    except UsageError:
        if STORE(mesh).read(service) is None:
            raise
        target = TrafficTarget(service, "http", (), ())  # a service that left the inventory: its key goes
    ctx.exit(_change(mesh, target, changes.without_override, None if no_wait else timeout))


@click.group("fault")
def fault() -> None:
    """Inject faults into the requests to a service at run time (by every caller's Envoy), or stop."""


@fault.command("set")
@click.argument("service")
@inventory_option
@click.option("--abort", default=None, metavar="PERCENT%[:STATUS]",
              help="Answer this share of requests with STATUS (default 503) instead of calling: 50%, 10%:500.")
@click.option("--delay", default=None, metavar="DURATION[:PERCENT%]",
              help="Hold this share of requests (default 100%) this long first: 2s, 500ms:10%.")
@click.option("--header", "headers", multiple=True, metavar="NAME=VALUE",
              help="Only requests carrying this header with this exact value (repeat: all of them).")
@wait_option
@no_wait_option
@click.pass_context
def fault_set(ctx: click.Context, service: str, inventory_option: str | None, abort: str | None,
              delay: str | None, headers: tuple[str, ...], wait_text: str, no_wait: bool) -> None:
    """Inject a fault into SERVICE's requests, in every caller's Envoy: `mesh fault set api --abort 50%
    --header x-test=1`, `mesh fault set api --delay 2s:25%`. It replaces the inventory's fault and any earlier
    run-time fault; a run-time split stays. HTTP services only."""
    wanted = options.parse_fault(abort, delay, headers)
    timeout = options.parse_seconds(wait_text, "--wait", MAX_WAIT_S)
    mesh = load_mesh(inventory_option)
    target = traffic_target(mesh, service)
    changes.checked(target, TrafficOverride(fault=wanted))
    ctx.exit(_change(mesh, target, changes.with_fault(target, wanted), None if no_wait else timeout))


@fault.command("reset")
@click.argument("service")
@inventory_option
@wait_option
@no_wait_option
@click.pass_context
def fault_reset(ctx: click.Context, service: str, inventory_option: str | None, wait_text: str,
                no_wait: bool) -> None:
    """Remove SERVICE's run-time fault (a run-time split stays; a fault written in the inventory comes back)."""
    timeout = options.parse_seconds(wait_text, "--wait", MAX_WAIT_S)
    mesh = load_mesh(inventory_option)
    target = traffic_target(mesh, service)
    ctx.exit(_change(mesh, target, changes.without_fault, None if no_wait else timeout))


def _change(mesh: Mesh, target: TrafficTarget, make: Make, timeout: float | None,
            store: TrafficStore | None = None, echo: Callable[[str], None] = click.echo,
            err: Callable[[str], None] = _err) -> int:
    """Store the change, say what is stored, and wait (timeout None: not) until every caller applied it."""
    store = store or STORE(mesh)
    service = target.service
    try:
        written = update(store, service, make, operator(), _now)
    except Unchanged as exc:
        inventory_fault = mesh.policy(service).fault is not None and make is changes.without_fault
        echo(f"{service}: {exc}: nothing to reset"
             + (" (the inventory's fault stays: it is written in mesh_services)" if inventory_fault else ""))
        return EXIT_OK
    if written.replaced:
        err(f"[WARNING]: the stored override of {service} could not be read ({written.replaced}): replaced")
    echo(f"{service}: {_stored_words(written)}")
    if timeout is None:
        echo(f"{service}: not waiting for the controllers (--no-wait)")
        return EXIT_OK
    if not target.callers:
        echo(f"{service}: no service calls {service}: nothing to wait for (callers deployed later get it)")
        return EXIT_OK
    waited = wait_applied(store, service, written.revision, timeout)
    if waited.applied:
        echo(f"{service}: applied to every caller ({', '.join(target.callers)}) in {waited.seconds:.1f} s")
        return EXIT_OK
    err(f"ERROR: {not_applied_text(service, written.revision, timeout, waited)}")
    return EXIT_ERROR


def _stored_words(written: Written) -> str:
    override = written.override
    if override is None:
        return "override removed (routing as the inventory says)"
    parts = []
    if override.split is not None:
        parts.append(f"split {options.split_text(override.split)}")
    if override.fault is not None:
        parts.append(f"fault: {fault_text(override.fault)}")
    return f"stored {'; '.join(parts)} (revision {override.revision})"


@click.command("rollout")
@click.argument("service")
@inventory_option
@click.option("--to", "to", required=True, metavar="VERSION", help="The version to move traffic to.")
@click.option("--steps", "steps_text", default="10,25,50,100", show_default=True, metavar="P1,P2,...,100",
              help="The new version's share at each step: whole percentages, increasing, the last 100.")
@click.option("--interval", "interval_text", default="30s", show_default=True, metavar="DURATION",
              help="How long each step is watched (at least 1s; Envoy publishes latencies every 5 s).")
@click.option("--max-error-rate", "error_text", default="1%", show_default=True, metavar="PERCENT",
              help="Roll back when more of the new version's requests than this fail (5xx).")
@click.option("--max-p99", "p99_text", default=None, metavar="DURATION",
              help="Roll back when the new version's p99 latency exceeds this (e.g. 250ms); default: not judged.")
@click.option("--min-requests", default=100, show_default=True, type=click.IntRange(1, 10**9), metavar="N",
              help="Judge a step only over at least this many requests to the new version.")
@click.option("--extra-intervals", default=3, show_default=True, type=click.IntRange(0, 1000), metavar="N",
              help="With fewer requests, watch up to N more intervals, then roll back (not enough traffic).")
@wait_option
@click.pass_context
def rollout_command(ctx: click.Context, service: str, inventory_option: str | None, to: str, steps_text: str,
                    interval_text: str, error_text: str, p99_text: str | None, min_requests: int,
                    extra_intervals: int, wait_text: str) -> None:
    """Move SERVICE's traffic to version --to step by step, judged by real traffic: at each step the new
    version gets the step's share (the versions serving now keep the rest, in proportion), every caller applies
    it, then the new version's requests, 5xx share and p99 (as its own proxies count them, read from their
    metrics ports as `mesh top` reads them) are watched for --interval. Over the limits: roll back to the split
    it started from (exit 1). Within them: the next step; after 100, done (exit 0). Ctrl-C (exit 99) leaves the
    last split every caller applied."""
    steps = options.parse_steps(steps_text)
    interval_s = options.parse_duration_ms(interval_text, "--interval", minimum_ms=1000) / 1000
    max_error = options.parse_percent_option(error_text, "--max-error-rate") / 100
    max_p99 = options.parse_duration_ms(p99_text, "--max-p99") if p99_text is not None else None
    timeout = options.parse_seconds(wait_text, "--wait", MAX_WAIT_S)
    mesh = load_mesh(inventory_option)
    target = traffic_target(mesh, service)
    check_rollout_target(target, to)
    store = STORE(mesh)
    plan = plan_rollout(mesh, target, to, store.read(service), steps, interval_s,
                        Limits(max_error, max_p99, min_requests, extra_intervals), timeout)
    meter = METER(mesh, service, to)
    try:
        code = Rollout(plan, store, meter, click.echo, _err, operator(), _now).run()
    finally:
        close = getattr(getattr(meter, "fetcher", None), "close", None)
        if close is not None:
            close()
    ctx.exit(code)
