"""The `mesh` command: parses arguments, calls one function per command, prints, maps errors to exit codes.

Exit codes are ansible-playbook's (INVENTORY.md): 4 parse error, 5 usage, 99 interrupted, 250 unexpected.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import click

from mesh import errors
from mesh.cli_inventory import fleet_inventory, inventory_argument, inventory_option
from mesh.hosts.timeouts import DEFAULT_TIMEOUTS
from mesh.log import configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-format", type=click.Choice(["console", "json"]), default=None, help="Log line format.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs.")
@click.version_option(package_name="mesh")
def cli(log_format: str | None, verbose: bool) -> None:
    """mesh: a service mesh for VMs and containers, deployed the Ansible way."""
    configure_logging(log_format, verbose)


@cli.group()
def inventory() -> None:
    """Read, print and check Ansible inventories."""


def _print_warnings(warnings: list[errors.InventoryWarning]) -> None:
    for warning in warnings:
        click.echo(f"[WARNING]: {warning}", err=True)


def _json_text(value: object) -> str:
    """Indented JSON for a person at a terminal; compact (and several times faster to write) when piped."""
    indent = 4 if sys.stdout.isatty() else None
    return json.dumps(value, indent=indent, sort_keys=True, ensure_ascii=False)


@inventory.command("list")
@click.argument("path")
def inventory_list(path: str) -> None:
    """Print the inventory as `ansible-inventory -i PATH --list` does."""
    from mesh.inventory.listing import list_inventory
    from mesh.inventory.loader import load_inventory

    data = load_inventory(path)
    _print_warnings(data.warnings)
    click.echo(_json_text(list_inventory(data)))


@inventory.command("host")
@click.argument("path")
@click.argument("name")
def inventory_host(path: str, name: str) -> None:
    """Print one host's variables as `ansible-inventory -i PATH --host NAME` does."""
    from mesh.inventory.listing import host_variables
    from mesh.inventory.loader import load_inventory

    data = load_inventory(path)
    _print_warnings([w for w in data.warnings])
    click.echo(_json_text(host_variables(data, name)))


@inventory.command("check")
@click.argument("path")
def inventory_check(path: str) -> None:
    """Refuse everything `mesh deploy` would refuse, before connecting to any host; print a summary."""
    from mesh.inventory.check import check_inventory
    from mesh.inventory.loader import load_inventory

    data = load_inventory(path)
    report = check_inventory(data)
    for line in report.summary_lines():
        click.echo(line)


def _add_lab_commands() -> None:
    from mesh.lab.commands import lab

    cli.add_command(lab)


_add_lab_commands()


def _add_ca_commands() -> None:
    from mesh.ca_commands import ca

    cli.add_command(ca)


_add_ca_commands()


def _add_controller_commands() -> None:
    from mesh.controller.commands import controller

    cli.add_command(controller)


_add_controller_commands()


def _add_telemetry_commands() -> None:
    from mesh.telemetry.commands import logs_command, metrics, top_command
    from mesh.traces.cli import trace_command

    for command in (logs_command, metrics, top_command, trace_command):
        cli.add_command(command)


_add_telemetry_commands()


def _add_traffic_commands() -> None:
    from mesh.traffic.commands import fault, rollout_command, route

    for command in (route, fault, rollout_command):
        cli.add_command(command)


_add_traffic_commands()


def _add_authz_commands() -> None:
    from mesh.authz.commands import authz

    cli.add_command(authz)


_add_authz_commands()


def _add_dashboard_command() -> None:
    from mesh.dashboard.command import dashboard_command

    cli.add_command(dashboard_command)


_add_dashboard_command()


@cli.command("deploy")
@inventory_argument
@inventory_option
@click.option("-C", "--check", is_flag=True, help="Show what would change; change nothing on the hosts.")
@click.option("-l", "--limit", default=None,
              help="Only these hosts: an Ansible host pattern over every inventory group; @FILE reads a retry file.")
@click.option("-t", "--tags", default=None, help="Only tasks with these tags (comma-separated).")
@click.option("-f", "--forks", default=20, show_default=True, type=click.IntRange(1, 500),
              help="Hosts deployed in parallel.")
@click.option("--replace-ca", is_flag=True, help="Re-trust hosts that trust another mesh CA with mesh_state_dir's "
              "(made on purpose by `mesh ca init`); every proxy gets a new certificate.")
@click.option("-D", "--diff", is_flag=True, help="Show each host's changes with unified diffs before acting.")
@click.option("--json", "as_json", is_flag=True, help="Print the change set and the recap as JSON on stdout.")
@click.option("--plan", "plan_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Apply exactly this plan (saved by `mesh plan -o FILE`); refused when it is stale.")
@click.option("--serial", default=None, metavar="N|N%|LIST",
              help="Roll out in batches: a count, a percentage of each play's hosts, or a list (1,5,25%); each "
                   "batch runs a whole play before the next. Overrides the playbook's `serial:`.")
@click.option("--max-fail-percentage", default=None, type=click.FloatRange(0, 100), metavar="PERCENT",
              help="Stop the rollout when more than this share of a batch failed (0: at the first failed host); "
                   "the rest is left untouched. Overrides the playbook's `max_fail_percentage:`.")
@click.option("-T", "--timeout", "connect_timeout", default=DEFAULT_TIMEOUTS.connect, show_default=True,
              type=click.FloatRange(min=1), metavar="SECONDS", help="SSH connect timeout (as Ansible's -T).")
@click.option("--command-timeout", default=DEFAULT_TIMEOUTS.command, show_default=True,
              type=click.FloatRange(min=1), metavar="SECONDS", help="Longest one remote command may run.")
@click.pass_context
def deploy_command(ctx: click.Context, inventory_path: str | None, inventory_option: str | None, check: bool,
                   limit: str | None, tags: str | None, forks: int, replace_ca: bool, diff: bool, as_json: bool,
                   plan_file: Path | None, serial: str | None, max_fail_percentage: float | None,
                   connect_timeout: float, command_timeout: float) -> None:
    """Deploy the mesh: CA, Envoy beside every VM workload, the health checker, Consul registrations.

    A host silent for 20 s (SSH keepalives unanswered) is reported unreachable while the others go on; after a
    run with failed or unreachable hosts, `--limit @<mesh_state_dir>/deploy.retry` deploys just those."""
    from mesh.deploy.command import DeployOptions, deploy
    from mesh.deploy.pacing import PacingError, parse_serial
    from mesh.hosts.connection import connector_factory

    tag_list = [tag.strip() for tag in tags.split(",") if tag.strip()] if tags else None
    try:
        batches = parse_serial(serial) if serial is not None else None
    except PacingError as exc:
        raise click.BadParameter(str(exc), param_hint="--serial") from None
    options = DeployOptions(check=check, limit=limit, tags=tag_list, forks=forks, replace_ca=replace_ca,
                            diff=diff, json=as_json, plan_file=plan_file, serial=batches,
                            max_fail_percentage=max_fail_percentage)
    timeouts = replace(DEFAULT_TIMEOUTS, connect=connect_timeout, command=command_timeout)
    ctx.exit(deploy(fleet_inventory(inventory_path, inventory_option), options,
                    connector_factory=connector_factory(timeouts)))


@cli.command("plan")
@inventory_argument
@inventory_option
@click.option("-l", "--limit", default=None, help="Only these hosts (an Ansible host pattern).")
@click.option("--json", "as_json", is_flag=True, help="Print the change set as JSON.")
@click.option("-o", "--out", "save_to", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Save the plan for `mesh deploy --plan FILE`.")
@click.option("-f", "--forks", default=20, show_default=True, type=click.IntRange(1, 500),
              help="Hosts read in parallel.")
@click.pass_context
def plan_command(ctx: click.Context, inventory_path: str | None, inventory_option: str | None, limit: str | None,
                 as_json: bool, save_to: Path | None, forks: int) -> None:
    """What `mesh deploy` would change, per host with diffs (files, units, sidecars, firewall, users, Consul);
    `no changes` on a converged fleet. Changes nothing."""
    from mesh.deploy.plan_command import plan

    ctx.exit(plan(fleet_inventory(inventory_path, inventory_option), limit, as_json, save_to, forks))


@cli.command("status")
@inventory_argument
@inventory_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (keys: README, mesh status).")
@click.pass_context
def status_command(ctx: click.Context, inventory_path: str | None, inventory_option: str | None,
                   as_json: bool) -> None:
    """Per proxy: reachable, Envoy running and its version, config applied and running, certificate, upstream
    health; the sidecar watcher, the checker, Consul. Exit 0 healthy, 2 unhealthy, 3 a host unreachable."""
    from mesh.status import status

    ctx.exit(status(fleet_inventory(inventory_path, inventory_option), as_json=as_json))


@cli.command("drain")
@click.argument("service")
@click.argument("host")
@inventory_option
@click.option("--undo", is_flag=True, help="Bring the instance(s) back (remove mesh's drain check).")
@click.pass_context
def drain_command(ctx: click.Context, service: str, host: str, inventory_option: str | None, undo: bool) -> None:
    """Take SERVICE's instance(s) on HOST out of every caller's endpoints (a critical Consul check of mesh's
    own, kept across deploys), or bring them back with --undo. Touches no host."""
    from mesh.drain import drain

    ctx.exit(drain(fleet_inventory(None, inventory_option), service, host, undo=undo))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns (and exits with) ansible-playbook's exit codes."""
    code = run(argv)
    sys.exit(code)


def run(argv: list[str] | None = None) -> int:
    try:
        # with standalone_mode=False, click returns a command's ctx.exit(code) instead of raising it
        returned = cli.main(args=argv, prog_name="mesh", standalone_mode=False)
        if isinstance(returned, int):
            return returned
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return errors.EXIT_INTERRUPTED
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return errors.EXIT_USAGE
    except errors.InventoryErrors as exc:
        for error in exc.errors:
            click.echo(f"ERROR: {error}", err=True)
        return exc.exit_code
    except errors.MeshError as exc:
        click.echo(f"ERROR: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return errors.EXIT_INTERRUPTED
    except BrokenPipeError:
        return errors.EXIT_OK
    except Exception as exc:  # noqa: BLE001 - a bug: one line for the user, the traceback only when asked
        click.echo(f"ERROR: unexpected {type(exc).__name__}: {exc} (MESH_DEBUG=1 shows the traceback)", err=True)
        if os.environ.get("MESH_DEBUG"):
            traceback.print_exc()
        return errors.EXIT_UNEXPECTED
    return errors.EXIT_OK
