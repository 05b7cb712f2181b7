"""Runs a playbook on managed hosts: plays in order, each in batches (`serial`), each task on every live host
of the batch in parallel, handlers at the end of a batch, stopping a rollout whose batch fails too much
(`max_fail_percentage`), the transcript, recap and retry file. It owns scheduling and counting; modules do the
host work.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import structlog

from mesh import package_data
from mesh.deploy import retry
from mesh.deploy.display import Display
from mesh.deploy.execute import HostRun, run_task
from mesh.deploy.modules import ModuleRegistry, registry
from mesh.deploy.pacing import Serial, exceeds
from mesh.deploy.patterns import match_hosts
from mesh.deploy.playbook import Play, Playbook, Task
from mesh.deploy.recap import format_recap
from mesh.deploy.results import HostStats, PlayResult, Stopped, TaskResult
from mesh.deploy.variables import Templar, task_scope
from mesh.hosts.connection import Connector, connect
from mesh.hosts.errors import HostUnreachable
from mesh.inventory.model import ManagedHost

log = structlog.get_logger()

ConnectorFactory = Callable[[ManagedHost], Connector]
REPO_TEMPLATES = package_data.templates_dir()


@dataclass
class _HostState:
    """One host across the run: its connector, registered results, whether it is still in play."""

    host: ManagedHost
    inventory: Mapping[str, Any]
    connector: Connector | None = None
    registered: dict[str, Any] = field(default_factory=dict)
    notified: set[str] = field(default_factory=set)
    dead: bool = False


class PlaybookRun:
    """One run of a playbook; see run_playbook. An object so that two runs never share state."""

    def __init__(self, playbook: Playbook, hosts: Sequence[ManagedHost], connector_factory: ConnectorFactory,
                 extra_vars: Mapping[str, Any], shared: Any, check: bool, forks: int,
                 tags: frozenset[str] | None, host_vars: Mapping[str, Mapping[str, Any]],
                 groups: Mapping[str, Sequence[str]], modules: ModuleRegistry, display: Display,
                 templates_dir: Path, serial: Serial | None = None, max_fail_percentage: float | None = None,
                 retry_file: Path | None = None) -> None:
        self.playbook = playbook
        self.factory = connector_factory
        self.extra_vars = dict(extra_vars)
        self.shared = shared
        self.check = check
        self.forks = max(1, forks)
        self.tags = tags
        self.groups = {**groups, "all": [host.name for host in hosts]}
        self.modules = modules
        self.display = display
        self.converged: tuple[str, ...] = ()
        self.templates_dir = templates_dir
        self.serial = serial  # given: every play's serial, whatever the play says
        self.max_fail_percentage = max_fail_percentage  # likewise
        self.retry_file = retry_file
        self.templar = Templar()
        self.result = PlayResult(check_mode=check)
        self._lock = threading.Lock()
        self.states = {host.name: _HostState(host, self._inventory_scope(host, host_vars.get(host.name, {})))
                       for host in hosts}

    def _inventory_scope(self, host: ManagedHost, variables: Mapping[str, Any]) -> Mapping[str, Any]:
        magic = {"inventory_hostname": host.name, "inventory_hostname_short": host.name.split(".")[0],
                 "groups": self.groups, "ansible_check_mode": self.check,
                 "group_names": sorted(g for g, members in self.groups.items()
                                       if host.name in members and g != "all"),
                 "playbook_dir": str(self.playbook.path.parent), "ansible_host": host.connection.address}
        return _Layered(variables, magic)

    def run(self) -> PlayResult:
        try:
            with ThreadPoolExecutor(max_workers=self.forks, thread_name_prefix="mesh-host") as pool:
                for index, play in enumerate(self.playbook.plays):
                    stopped = self._play(play, pool)
                    if stopped is not None:
                        self.result.stopped = self._not_reached(stopped, self.playbook.plays[index + 1:])
                        self.display.line(f"[ERROR]: {self.result.stopped.describe()}", "failed")
                        break
        finally:
            for state in self.states.values():
                if state.connector is not None:
                    state.connector.close()
        for name in self.converged:  # observed before the run with nothing to change: never connected
            self.result.stats.setdefault(name, HostStats())
        self._write_retry_file()
        self.display.line(format_recap(self.result).rstrip("\n") + "\n")
        return self.result

    def _play(self, play: Play, pool: ThreadPoolExecutor) -> Stopped | None:
        """The play, batch after batch; a Stopped when a batch failed too much (the run stops there)."""
        names, unknown = match_hosts(play.hosts, list(self.states), self.groups)
        for term in unknown:
            self.display.warning(f"Could not match supplied host pattern, ignoring: {term}")
        live = [self.states[name] for name in names if not self.states[name].dead]
        serial = self.serial or play.serial
        max_fail = self.max_fail_percentage if self.max_fail_percentage is not None else play.max_fail_percentage
        batches = serial.batches(live) if serial is not None else [live]
        for number, batch in enumerate(batches, 1):
            self.display.header(f"PLAY [{play.name}]")
            if not batch:
                self.display.line("skipping: no hosts matched", "skipped")
                return None
            rolling = serial is not None and not serial.all_at_once
            stopped = self._batch(play, batch, pool, max_fail, every_failed_stops=rolling)
            if stopped is not None:
                left = tuple(state.host.name for later in batches[number:] for state in later)
                return Stopped(play.name, number, len(batches), *stopped, not_reached=left)
        return None

    def _batch(self, play: Play, batch: list[_HostState], pool: ThreadPoolExecutor, max_fail: float | None,
               every_failed_stops: bool) -> tuple[tuple[str, ...], int, float | None, tuple[str, ...]] | None:
        """The play's tasks and handlers on one batch; (failed, size, max_fail, cut off) when it stops the run:
        its failed hosts go over max_fail_percentage (checked after every task, as Ansible does), or every host
        of a batch of a rolling play (serial other than 0 or 100%) failed. Unlike Ansible, a play run all at once
        whose hosts all failed does not stop the later plays: mesh's plays are cut by host kind, and a failed
        container host must not keep the controllers from being deployed."""
        for state in batch:
            self.result.touch(state.host.name)
            state.notified.clear()
        for task in play.tasks:
            if not self._selected(task):
                continue
            if not self._task(play, task, [s for s in batch if not s.dead], pool, "TASK"):
                break
            failed = tuple(s.host.name for s in batch if s.dead)
            if exceeds(len(failed), len(batch), max_fail):
                self.display.header("NO MORE HOSTS LEFT")
                cut_off = tuple(s.host.name for s in batch if not s.dead)
                for state in batch:
                    state.dead = True
                return failed, len(batch), max_fail, cut_off
        else:
            self._handlers(play, batch, pool)
        failed = tuple(s.host.name for s in batch if s.dead)
        if exceeds(len(failed), len(batch), max_fail):
            return failed, len(batch), max_fail, ()
        if len(failed) == len(batch):
            self.display.header("NO MORE HOSTS LEFT")
            if every_failed_stops:
                return failed, len(batch), None, ()
        return None

    def _not_reached(self, stopped: Stopped, later: Sequence[Play]) -> Stopped:
        """stopped, naming every host a later play would have deployed too (those the run did not fail)."""
        left = list(stopped.not_reached)
        for play in later:
            names, _ = match_hosts(play.hosts, list(self.states), self.groups)
            left += [name for name in names if not self.states[name].dead]
        return replace(stopped, not_reached=tuple(dict.fromkeys(left)))

    def _write_retry_file(self) -> None:
        if self.retry_file is None or self.check:
            return
        hosts = retry.update(self.retry_file, self.result.retry_hosts, self.result.converged_hosts)
        if self.result.retry_hosts:
            self.display.line(f"\tto retry, use: --limit @{self.retry_file}   ({', '.join(hosts)})")

    def _selected(self, task: Task) -> bool:
        if self.tags is None or "always" in task.tags:
            return True
        return bool(task.tags & self.tags) or ("untagged" in self.tags and not task.tags)

    def _handlers(self, play: Play, live: list[_HostState], pool: ThreadPoolExecutor) -> None:
        for handler in play.handlers:
            names = {handler.name, *handler.listen}
            hosts = [s for s in live if not s.dead and s.notified & names]
            if hosts:
                self._task(play, handler, hosts, pool, "RUNNING HANDLER")

    def _task(self, play: Play, task: Task, hosts: list[_HostState], pool: ThreadPoolExecutor,
              kind: str) -> bool:
        """Run task on hosts in parallel; False when no host is left."""
        if not hosts:
            return False
        self.display.header(f"{kind} [{task.name}]")
        list(pool.map(lambda state: self._on_host(play, task, state), hosts))
        return any(not state.dead for state in hosts)

    def _on_host(self, play: Play, task: Task, state: _HostState) -> None:
        name = state.host.name
        try:
            if state.connector is None:
                state.connector = self.factory(state.host)
            run = HostRun(state.host, state.connector, self.modules, self.templar, self.check, self.shared,
                          self.templates_dir, self.playbook.path.parent)
            result = run_task(run, task, lambda item: self._scope(play, task, state, item),
                              lambda item_result, item: self.display.result(name, item_result, item, True))
        except HostUnreachable as exc:
            result = TaskResult("unreachable", exc.detail)
        self._record(play, task, state, result)

    def _scope(self, play: Play, task: Task, state: _HostState,
               item: Mapping[str, Any] | None) -> Mapping[str, Any]:
        return task_scope(self.templar, state.inventory, play.vars, task.vars, state.registered,
                          self.extra_vars, item)

    def _record(self, play: Play, task: Task, state: _HostState, result: TaskResult) -> None:
        name = state.host.name
        if task.register and result.status != "unreachable":
            state.registered[task.register] = result.registered()
        if result.changed:
            state.notified.update(task.notify)
            self._check_notify(play, task)
        if result.status == "unreachable" or (result.failed and not result.ignored):
            state.dead = True
        if not result.items or result.status in ("failed", "unreachable", "skipped"):
            self.display.result(name, result)
        with self._lock:
            self.result.record(name, task.name, result)

    def _check_notify(self, play: Play, task: Task) -> None:
        known = {name for handler in play.handlers for name in (handler.name, *handler.listen)}
        for name in task.notify:
            if name not in known:
                self.display.warning(f"The requested handler '{name}' was not found in the play's handlers")


class _Layered(Mapping[str, Any]):
    """A host's inventory variables over Ansible's magic ones (inventory_hostname, groups...)."""

    def __init__(self, variables: Mapping[str, Any], magic: Mapping[str, Any]) -> None:
        self._variables = variables
        self._magic = magic

    def __getitem__(self, key: str) -> Any:
        return self._variables[key] if key in self._variables else self._magic[key]

    def __contains__(self, key: object) -> bool:
        return key in self._variables or key in self._magic

    def __iter__(self) -> Any:
        return iter({**dict.fromkeys(self._magic), **dict.fromkeys(self._variables)})

    def __len__(self) -> int:
        return sum(1 for _ in self)


def run_playbook(playbook: Playbook, hosts: Sequence[ManagedHost], connector_factory: ConnectorFactory = connect,
                 extra_vars: Mapping[str, Any] | None = None, shared: Any = None, check: bool = False,
                 forks: int = 10, tags: Sequence[str] | None = None, *,
                 host_vars: Mapping[str, Mapping[str, Any]] | None = None,
                 groups: Mapping[str, Sequence[str]] | None = None, modules: ModuleRegistry | None = None,
                 output: TextIO | None = None, color: bool | None = None,
                 templates_dir: Path | None = None, serial: Serial | None = None,
                 max_fail_percentage: float | None = None, retry_file: Path | None = None,
                 converged: Sequence[str] = ()) -> PlayResult:
    """Run every play of playbook on the hosts its `hosts:` pattern selects among hosts; print as
    ansible-playbook does and return the counters (recap.exit_code gives the exit code).

    host_vars: each host's inventory variables (for templates and `when`); groups: group -> host names
    (for patterns); check: compute changes without applying them; tags: run only tasks with these tags;
    serial, max_fail_percentage: every play's, overriding the plays' own; retry_file: where the hosts that still
    need the playbook are written after the run (not in check mode), see retry.py; converged: hosts left out
    of the run because they hold everything already, listed in the recap with nothing done.
    """
    runner = PlaybookRun(
        playbook, hosts, connector_factory, extra_vars or {}, shared, check, forks,
        frozenset(tags) if tags is not None else None, host_vars or {}, groups or {},
        modules or registry, Display(output or sys.stdout, color), templates_dir or REPO_TEMPLATES,
        serial, max_fail_percentage, retry_file)
    runner.converged = tuple(converged)
    return runner.run()
