"""`mesh authz check/matrix/show/deny`: thin click commands over mesh.authz. They parse the arguments (bad ones
exit 5), load the inventory (a bad one exits 4), read the run-time denies from Consul (a Consul that does not
answer is a warning: answers then follow the inventory), answer or change the deny and wait for the controllers;
exit 0 answered or done, 1 a deny not applied in time.

`STORE` makes the Consul store; tests replace it with a fake.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType

import click
from rich.console import Console

from mesh.authz import changes
from mesh.authz.changes import known_service, known_source
from mesh.authz.explain import answer, callers_of, cell, every_service_authz, matrix_sources, service_authz
from mesh.authz.kv import AuthzStore, ConsulAuthz, StoredDeny
from mesh.authz.view import (
    Checked,
    check_json,
    check_lines,
    inactive_text,
    matrix_json,
    print_matrix,
    show_json,
    show_text,
)
from mesh.cli_inventory import inventory_option
from mesh.config.authz import AuthzRequest, source_id
from mesh.drain import operator
from mesh.errors import EXIT_ERROR, EXIT_OK, UsageError
from mesh.inventory.model import Mesh
from mesh.inventory.policy import AuthzOverride
from mesh.inventory.policy_values import check_method, check_path
from mesh.inventory.values import BadValue
from mesh.runtime_kv import AppliedRevisions, Unchanged, not_applied_text, read_all_or_warn, wait_applied
from mesh.status.output import PIPED_WIDTH
from mesh.traffic.commands import MAX_WAIT_S, load_mesh, no_wait_option, wait_option
from mesh.traffic.options import parse_header, parse_seconds


def _consul_store(mesh: Mesh) -> AuthzStore:
    return ConsulAuthz.of(mesh)


STORE: Callable[[Mesh], AuthzStore] = _consul_store
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (keys: README, Authorization).")


def _err(text: str) -> None:
    click.echo(text, err=True)


def _warn(text: str) -> None:
    _err(f"[WARNING]: {text}")


def _json(value: object) -> None:
    click.echo(json.dumps(value, indent=2 if sys.stdout.isatty() else None, ensure_ascii=False))


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)


def _stored_denies(mesh: Mesh) -> Mapping[str, StoredDeny]:
    """Every run-time deny in Consul; none (with a warning) when Consul does not answer."""
    if not mesh.settings.consul_url:
        return MappingProxyType({})
    return read_all_or_warn(lambda: STORE(mesh), _warn, "denies (mesh authz deny)",
                            "answers follow the inventory alone")


@click.group("authz")
def authz() -> None:
    """Who may call whom: ask (check, matrix), look (show), or deny a caller at run time (deny)."""


@authz.command("check")
@click.argument("source")
@click.argument("destination")
@click.argument("method", required=False)
@click.argument("path", required=False)
@click.option("--header", "headers", multiple=True, metavar="NAME=VALUE", help="A header the request carries.")
@inventory_option
@json_option
def check_command(source: str, destination: str, method: str | None, path: str | None, headers: tuple[str, ...],
                  inventory_option: str | None, as_json: bool) -> None:
    """Would DESTINATION's proxies let SOURCE's request through, and which rule decides: `mesh authz check web api
    GET /orders`. SOURCE is a service, a SPIFFE id or `unauthenticated` (a plaintext client); METHOD and PATH (HTTP
    only) default to GET /. Run-time denies in Consul count. Exit 0 with either answer."""
    if method is not None and method.startswith("/") and path is None:
        method, path = None, method  # `check web api /orders`
    method_text = _method(method)
    path_text = _path(path)
    pairs = tuple(parse_header(header) for header in headers)
    mesh = load_mesh(inventory_option)
    service = known_service(mesh, destination)
    src = known_source(mesh, source)
    identity = source_id(mesh.settings.trust_domain, src)
    if mesh.services[service][0].protocol == "tcp":
        if method is not None or path is not None or pairs:
            raise UsageError(f"{service} is a TCP service: a connection has no method, path or headers",
                             f"ask `mesh authz check {source} {service}`")
        request = AuthzRequest(identity)
    else:
        request = AuthzRequest(identity, method_text, path_text, pairs)
    target = service_authz(mesh, service, _stored_denies(mesh).get(service))
    if target.problems:
        _warn(f"the run-time deny of {service} is ignored: {'; '.join(target.problems)}")
    checked = Checked(src, target, request, answer(target, request))
    if as_json:
        _json(check_json(checked))
        return
    for text, colour in check_lines(checked):
        click.echo(click.style(text, fg=colour) if colour and sys.stdout.isatty() else text)


def _method(method: str | None) -> str:
    if method is None:
        return "GET"
    try:
        checked = check_method(method)
    except BadValue as exc:
        raise UsageError(f"METHOD: {exc}") from None
    if checked != method:
        raise UsageError(f"METHOD: HTTP methods are upper case: {checked}, not {method!r}")
    return checked


def _path(path: str | None) -> str:
    if path is None:
        return "/"
    try:
        return check_path(path)
    except BadValue as exc:
        raise UsageError(f"PATH: {exc}") from None


@authz.command("matrix")
@inventory_option
@json_option
def matrix_command(inventory_option: str | None, as_json: bool) -> None:
    """Every service against every service (and `unauthenticated` when some service is permissive): allow, deny,
    or partial (some requests only), as the proxies decide it, run-time denies included."""
    mesh = load_mesh(inventory_option)
    every = every_service_authz(mesh, _stored_denies(mesh))
    sources = matrix_sources(mesh, every)
    destinations = tuple(every)
    cells = {(source, destination): cell(every[destination], source)
             for source in sources for destination in destinations}
    if as_json:
        _json(matrix_json(sources, destinations, cells))
    else:
        print_matrix(sources, cells, destinations, _console())


@authz.command("show")
@click.argument("service", required=False)
@inventory_option
@json_option
def show_command(service: str | None, inventory_option: str | None, as_json: bool) -> None:
    """The authorization of SERVICE (default: every service): mtls mode, the mesh's default and who it lets in,
    the inventory's deny and allow rules (shadow ones marked), the run-time deny and whether every instance
    enforces it."""
    mesh = load_mesh(inventory_option)
    if service is not None:
        known_service(mesh, service)
    stored = _stored_denies(mesh)
    applied = STORE(mesh).applied() if mesh.settings.consul_url else AppliedRevisions(
        False, "mesh_consul_url is not set")
    chosen = [service] if service is not None else sorted(mesh.services)
    every = {name: service_authz(mesh, name, stored.get(name)) for name in chosen}
    strays = sorted(set(stored) - set(mesh.services)) if service is None else []
    if as_json:
        _json({"services": [show_json(item, applied) for item in every.values()],
               "ignored_denies": strays})
        return
    click.echo("\n".join(show_text(item, applied) for item in every.values()), nl=False)
    for name in strays:
        click.echo(f"run-time deny of {name}: ignored, the inventory has no service {name!r} "
                   f"(`mesh authz deny {name} --undo` removes it)")
    inactive = inactive_text(applied)
    if inactive is not None:
        click.echo(inactive)


@authz.command("deny")
@click.argument("destination")
@click.option("--from", "sources", multiple=True, metavar="SRC",
              help="A service or SPIFFE id to deny (repeat for several).")
@click.option("--undo", is_flag=True, help="Remove these sources from the run-time deny (every one without --from).")
@inventory_option
@wait_option
@no_wait_option
@click.pass_context
def deny_command(ctx: click.Context, destination: str, sources: tuple[str, ...], undo: bool,
                 inventory_option: str | None, wait_text: str, no_wait: bool) -> None:
    """Refuse SRC's requests to DESTINATION now, on every instance of it (a run-time deny in Consul KV, applied by
    the controllers without a restart and kept until --undo): `mesh authz deny api --from web`. Waits until
    every instance enforces it: exit 1 when that does not happen in time (the deny stays stored)."""
    if not sources and not undo:
        raise UsageError("give --from SRC (a service or SPIFFE id)", f"e.g. mesh authz deny {destination} --from web")
    timeout = parse_seconds(wait_text, "--wait", MAX_WAIT_S)
    mesh = load_mesh(inventory_option)
    if destination not in mesh.services and not (undo and _stored_denies(mesh).get(destination)):
        known_service(mesh, destination)
    chosen = tuple(dict.fromkeys(known_source(mesh, source, runtime_deny=True) for source in sources))
    if undo:
        make = changes.without_denied(chosen)
    else:
        changes.checked(mesh, AuthzOverride(tuple(sorted(chosen))))  # refused (exit 5) before Consul is asked
        make = changes.with_denied(mesh, chosen)
    ctx.exit(_change(mesh, destination, make, None if no_wait else timeout, chosen if not undo else ()))


def _change(mesh: Mesh, service: str, make: changes.Make, timeout: float | None, denied: tuple[str, ...]) -> int:
    """Store the change, say what is stored, and wait (timeout None: not) until every instance enforces it."""
    store = STORE(mesh)
    try:
        written = changes.update(store, service, make, operator(), lambda: datetime.now(UTC))
    except Unchanged as exc:
        click.echo(f"{service}: {exc}: nothing to change")
        return EXIT_OK
    if written.replaced:
        _warn(f"the stored run-time deny of {service} could not be read ({written.replaced}): replaced")
    override = written.override
    click.echo(f"{service}: run-time deny from {', '.join(override.deny_from)} stored (revision {override.revision})"
               if override is not None else f"{service}: run-time deny removed (the inventory's rules hold)")
    for caller in sorted(set(denied) & set(callers_of(mesh, service))):
        click.echo(f"{service}: note: {caller} lists {service} in its upstreams: its calls to {service} now fail")
    if timeout is None:
        click.echo(f"{service}: not waiting for the controllers (--no-wait)")
        return EXIT_OK
    waited = wait_applied(store, service, written.revision, timeout)
    instances = len(mesh.services.get(service, ()))
    if waited.applied:
        click.echo(f"{service}: applied by every instance ({instances}) in {waited.seconds:.1f} s")
        return EXIT_OK
    _err(f"ERROR: {not_applied_text(service, written.revision, timeout, waited, 'every instance')}")
    return EXIT_ERROR
