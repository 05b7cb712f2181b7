"""What a run produced: one result per task and host, counters per host, the result of a whole run.
It owns the shapes and the counting rules of ansible-playbook's recap; it must not print or run anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "changed", "failed", "skipped", "unreachable"]


@dataclass(frozen=True)
class TaskResult:
    """The result of one task (all its loop items) on one host; data is what `register` stores."""

    status: Status
    msg: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    items: tuple[TaskResult, ...] = ()
    ignored: bool = False  # failed, but the task said ignore_errors
    changed_anyway: bool = False  # failed after changing something (failed_when false makes it changed)

    @property
    def changed(self) -> bool:
        return self.status == "changed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def registered(self) -> dict[str, Any]:
        """The value `register:` stores, shaped as Ansible's (changed, failed, skipped, msg, results...)."""
        value: dict[str, Any] = dict(self.data)
        value.update(changed=self.changed, failed=self.failed, skipped=self.status == "skipped")
        if self.msg:
            value["msg"] = self.msg
        if self.items:
            value["results"] = [item.registered() for item in self.items]
        return value


@dataclass
class HostStats:
    """The PLAY RECAP counters of one host (ok counts changed tasks too, as Ansible does)."""

    ok: int = 0
    changed: int = 0
    unreachable: int = 0
    failed: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0

    def count(self, result: TaskResult) -> None:
        if result.status == "unreachable":
            self.unreachable += 1
        elif result.status == "failed" and result.ignored:
            self.ok += 1  # as ansible-playbook counts an ignored failure: ok and ignored
            self.ignored += 1
        elif result.status == "failed":
            self.failed += 1
        elif result.status == "skipped":
            self.skipped += 1
        else:
            self.ok += 1
            self.changed += result.status == "changed"


@dataclass(frozen=True)
class Stopped:
    """Why a run stopped before every host had every play (a rollout's batch failed too much)."""

    play: str
    batch: int  # counting from 1
    batches: int
    failed: tuple[str, ...]  # failed or unreachable hosts of that batch
    batch_size: int
    max_fail_percentage: float | None  # None: stopped because every host of the batch failed
    stopped: tuple[str, ...] = ()  # hosts of the batch cut off mid-play (the rest of their tasks not run)
    not_reached: tuple[str, ...] = ()  # hosts later batches and plays would have deployed: untouched

    def describe(self) -> str:
        why = (f"over max_fail_percentage {self.max_fail_percentage:g}" if self.max_fail_percentage is not None
               else "every host of the batch")
        where = f"play [{self.play}]" + (f" batch {self.batch}/{self.batches}" if self.batches > 1 else "")
        text = (f"the rollout stopped in {where}: {len(self.failed)} of {self.batch_size} hosts failed ({why}: "
                f"{', '.join(self.failed)})")
        if self.stopped:
            text += f"; stopped mid-play: {', '.join(self.stopped)}"
        return text + f"; not deployed: {', '.join(self.not_reached) or 'none'}"


@dataclass
class PlayResult:
    """The result of running a playbook: counters per host (in the order hosts were first seen)."""

    stats: dict[str, HostStats] = field(default_factory=dict)
    results: list[tuple[str, str, TaskResult]] = field(default_factory=list)  # (host, task name, result)
    check_mode: bool = False
    stopped: Stopped | None = None

    def record(self, host: str, task: str, result: TaskResult) -> None:
        self.stats.setdefault(host, HostStats()).count(result)
        self.results.append((host, task, result))

    def touch(self, host: str) -> None:
        self.stats.setdefault(host, HostStats())

    @property
    def failed_hosts(self) -> list[str]:
        return [host for host, stats in self.stats.items() if stats.failed]

    @property
    def unreachable_hosts(self) -> list[str]:
        return [host for host, stats in self.stats.items() if stats.unreachable]

    @property
    def retry_hosts(self) -> list[str]:
        """Hosts that still need this deploy: failed, unreachable, or left out because the rollout stopped."""
        left = (*self.stopped.stopped, *self.stopped.not_reached) if self.stopped else ()
        return list(dict.fromkeys([*self.failed_hosts, *self.unreachable_hosts, *left]))

    @property
    def converged_hosts(self) -> list[str]:
        """Hosts that ran every play meant for them without failing."""
        retry = set(self.retry_hosts)
        return [host for host in self.stats if host not in retry]
