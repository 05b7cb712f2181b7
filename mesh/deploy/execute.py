"""Runs one task on one host: loop items, `when`, rendered arguments, the module's changes applied (or only
computed in check mode), then `changed_when`/`failed_when`. It must not print plays or schedule hosts.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules import ModuleRegistry
from mesh.deploy.modules.api import Change, Outcome, PutFile, TaskContext
from mesh.deploy.playbook import Task
from mesh.deploy.results import TaskResult
from mesh.deploy.variables import ExpressionError, Templar
from mesh.hosts.connection import CommandResult, Connector, RemoteError
from mesh.hosts.errors import FactError, HostUnreachable
from mesh.inventory.model import ManagedHost

log = structlog.get_logger()

ItemReporter = Callable[[TaskResult, Any], None]


@dataclass(frozen=True)
class HostRun:
    """What a task needs about its host and run (one per host and play)."""

    host: ManagedHost
    connector: Connector
    modules: ModuleRegistry
    templar: Templar
    check: bool
    shared: Any
    templates_dir: Path
    files_dir: Path


def apply_change(change: Change, connector: Connector) -> CommandResult | None:
    """Carry out one change on the host; a failed command fails the task (unless it said not to)."""
    if isinstance(change, PutFile):
        connector.put(change.data, change.path, change.mode, change.owner, change.group)
        return None
    result = connector.run(change.cmd, stdin=change.stdin)
    if change.check_exit and not result.ok:
        raise ModuleFailure(f"{change.description or change.cmd} failed (exit {result.code}): "
                            f"{result.error_text()}", rc=result.code)
    return result


def run_module(run: HostRun, task: Task, args: dict[str, Any], scope: Mapping[str, Any]) -> TaskResult:
    """Drive a module: every change it yields is applied (not in check mode) and its result sent back."""
    spec = run.modules.resolve(task.module)
    assert spec is not None, task.module  # the playbook reader checked it
    ctx: TaskContext[Any] = TaskContext(run.host, run.connector, scope, run.check, run.shared,
                                        run.templates_dir, run.files_dir)
    steps = spec.run(ctx, args)
    changed = False
    try:
        change = next(steps)
        while True:
            changed = changed or isinstance(change, PutFile) or change.changes
            applied = None if run.check else apply_change(change, run.connector)
            log.debug("change", host=run.host.name, task=task.name, change=_describe(change), check=run.check)
            change = steps.send(applied)
    except StopIteration as stop:
        outcome: Outcome = stop.value or Outcome()
    except ModuleFailure as exc:
        return TaskResult("failed", exc.message, dict(exc.data), changed_anyway=changed)
    except FactError as exc:
        return TaskResult("failed", str(exc), changed_anyway=changed)
    if outcome.failed:
        return TaskResult("failed", outcome.msg, dict(outcome.data), changed_anyway=changed)
    return TaskResult("changed" if changed else "ok", outcome.msg, dict(outcome.data))


def _describe(change: Change) -> str:
    return change.description or (change.path if isinstance(change, PutFile) else change.cmd)


def run_item(run: HostRun, task: Task, scope: Mapping[str, Any]) -> TaskResult:
    """One task (or one loop item): when, arguments, module, changed_when and failed_when."""
    try:
        if not run.templar.all_true(task.when, scope):
            return TaskResult("skipped", "Conditional result was False")
        args = run.templar.render(dict(task.args), scope)
        result = run_module(run, task, args, scope)
    except HostUnreachable:
        raise
    except (ModuleFailure, RemoteError, ExpressionError) as exc:
        result = TaskResult("failed", str(exc))
    except Exception as exc:  # a module's bug fails its task on this host, not the run
        log.exception("module crashed", host=run.host.name, task=task.name)
        result = TaskResult("failed", f"module {task.module} crashed: {type(exc).__name__}: {exc}")
    return _overrides(run, task, scope, result)


def _overrides(run: HostRun, task: Task, scope: Mapping[str, Any], result: TaskResult) -> TaskResult:
    if task.changed_when is None and task.failed_when is None:
        return result
    seen = ChainMap({task.register: result.registered()} if task.register else {}, scope)  # type: ignore[arg-type]
    status = result.status
    try:
        if task.changed_when is not None and status != "failed":
            status = "changed" if run.templar.all_true(task.changed_when, seen) else "ok"
        if task.failed_when is not None:
            failed = run.templar.all_true(task.failed_when, seen)
            if failed:
                status = "failed"
            elif status == "failed":
                status = "changed" if result.changed_anyway and task.changed_when is None else "ok"
    except ExpressionError as exc:
        return TaskResult("failed", str(exc), result.data)
    msg = result.msg if status == "failed" or result.status != "failed" else ""
    return TaskResult(status, msg or ("failed_when matched" if status == "failed" else ""), result.data)


def run_task(run: HostRun, task: Task, scope_for: Callable[[Mapping[str, Any] | None], Mapping[str, Any]],
             report_item: ItemReporter) -> TaskResult:
    """The task on this host, over its loop when it has one; ignore_errors applied. Raises HostUnreachable."""
    if task.loop is None:
        return _ignoring(task, run_item(run, task, scope_for(None)))
    try:
        items = run.templar.render(task.loop, scope_for(None))
    except ExpressionError as exc:
        return _ignoring(task, TaskResult("failed", f"loop: {exc}"))
    if not isinstance(items, list):
        return _ignoring(task, TaskResult("failed", f"loop must give a list, not {type(items).__name__}"))
    results = []
    for item in items:
        result = run_item(run, task, scope_for({task.loop_var: item}))
        result = TaskResult(result.status, result.msg, {**result.data, task.loop_var: item})
        report_item(result, item)
        results.append(result)
    return _ignoring(task, _aggregate(results))


def _aggregate(results: list[TaskResult]) -> TaskResult:
    statuses = {result.status for result in results}
    if "failed" in statuses:
        return TaskResult("failed", "One or more items failed", items=tuple(results))
    if "changed" in statuses:
        return TaskResult("changed", items=tuple(results))
    if statuses == {"skipped"} or not results:
        return TaskResult("skipped", "All items skipped" if results else "No items in the list",
                          items=tuple(results))
    return TaskResult("ok", items=tuple(results))


def _ignoring(task: Task, result: TaskResult) -> TaskResult:
    if result.failed and task.ignore_errors:
        return TaskResult(result.status, result.msg, result.data, result.items, ignored=True)
    return result
