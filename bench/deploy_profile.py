"""Where a `mesh deploy` spends its time: run it in this process with every host connector wrapped, and print
the phases (top-level calls of the deploy command), the tasks (slowest host, round trips per host), and per
host the SSH connections, remote commands and file transfers. Used by bench/deploy on a no-op deploy.

    python bench/deploy_profile.py INVENTORY [REPORT_FILE]

Generic on purpose (mesh is changing): it wraps `connect` wherever a mesh module imported it, `run_task` when the
runner has one, and whichever of the listed phase functions exist; `mesh deploy INVENTORY` runs through the CLI.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import redirect_stdout
from typing import Any

STARTED = time.perf_counter()

PHASES = {  # module: function names, whichever exist (top-level steps of a deploy)
    "mesh.deploy.command": ["load_inventory", "check_inventory", "load_playbook", "_consul_preflight",
                            "_wheels", "_sidecar_image", "_host_vars", "run_playbook", "_sync_catalog",
                            "build_plan", "plan"],
    "mesh.deploy.trust": ["trusted_ca"],
    "mesh.deploy.prepare": ["prepare"],
    "mesh.controller_env": ["build_wheels"],
    "mesh.catalog": ["sync", "plan"],
}

_local = threading.local()
_lock = threading.Lock()
phases: list[tuple[float, float, str]] = []  # start, seconds, name
connections: dict[str, int] = defaultdict(int)
commands: list[tuple[str, str, str, float, int]] = []  # host, task, what, seconds, bytes sent
tasks: dict[tuple[str, str], float] = {}  # (task, host) -> seconds
task_order: list[str] = []


def _timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            with _lock:
                phases.append((start - STARTED, time.perf_counter() - start, name))
    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    return wrapper


class CountingConnector:
    """A connector that records every remote call; the connection itself is counted at its first call."""

    def __init__(self, inner: Any, host: str) -> None:
        self._inner, self._host, self._used = inner, host, False

    def _record(self, what: str, start: float, sent: int) -> None:
        with _lock:
            if not self._used:
                self._used = True
                connections[self._host] += 1
            commands.append((self._host, getattr(_local, "task", "(outside a task)"), what,
                             time.perf_counter() - start, sent))

    def run(self, cmd: str, stdin: bytes | None = None, timeout: float | None = None) -> Any:
        start = time.perf_counter()
        try:
            return self._inner.run(cmd, stdin=stdin, timeout=timeout)
        finally:
            self._record("run " + " ".join(cmd.split())[:90], start, len(stdin or b""))

    def put(self, data: bytes, path: str, mode: int, owner: str | None = None, group: str | None = None) -> None:
        start = time.perf_counter()
        try:
            self._inner.put(data, path, mode, owner, group)
        finally:
            self._record(f"put {path}", start, len(data))

    def get(self, path: str) -> Any:
        start = time.perf_counter()
        try:
            return self._inner.get(path)
        finally:
            self._record(f"get {path}", start, 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _functions(value: Any) -> list[Any]:
    """value itself when it is a Python function, the methods when it is a class."""
    import types

    if isinstance(value, types.FunctionType):
        return [value]
    if isinstance(value, type):
        return [v for v in vars(value).values() if isinstance(v, types.FunctionType)]
    return []


def install() -> None:
    import importlib

    import mesh.cli  # noqa: F401  (imports the deploy command's modules)

    command = importlib.import_module("mesh.deploy.command")
    original = getattr(command, "connect", None)
    if original is None:  # wherever the connector factory lives now (mesh.hosts or mesh.deploy)
        original = next(m.connect for n, m in sorted(sys.modules.items())
                        if n.startswith("mesh") and n.endswith(".connection") and hasattr(m, "connect"))

    def counting_connect(host: Any) -> Any:
        return CountingConnector(original(host), host.name)

    for name, module in list(sys.modules.items()):
        if not name.startswith("mesh"):
            continue
        if getattr(module, "connect", None) is original:
            module.connect = counting_connect  # type: ignore[attr-defined]
        for value in list(vars(module).values()):  # defaults bound at definition (connector_factory=connect)
            for function in _functions(value):
                if function.__defaults__ and any(d is original for d in function.__defaults__):
                    function.__defaults__ = tuple(counting_connect if d is original else d
                                                  for d in function.__defaults__)
                if function.__kwdefaults__:
                    for key, default in function.__kwdefaults__.items():
                        if default is original:
                            function.__kwdefaults__[key] = counting_connect
    for module_name, names in PHASES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            if callable(getattr(module, name, None)):
                setattr(module, name, _timed(f"{module_name.split('.')[-1]}.{name}", getattr(module, name)))
    # functions imported by name elsewhere (command.py imports run_playbook from the runner)
    for name, module in list(sys.modules.items()):
        if not name.startswith("mesh"):
            continue
        for attr in ("run_playbook", "load_inventory", "check_inventory", "build_plan", "validate_plan",
                     "observe_fleet", "prepare", "trusted_ca"):
            value = getattr(module, attr, None)
            if callable(value) and not hasattr(value, "__wrapped__"):
                setattr(module, attr, _timed(attr, value))
    try:
        runner = importlib.import_module("mesh.deploy.runner")
    except ImportError:
        return
    run_task = getattr(runner, "run_task", None)
    if callable(run_task):
        def timed_task(run: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
            name = getattr(task, "name", "?")
            host = getattr(getattr(run, "host", None), "name", "?")
            _local.task = name
            start = time.perf_counter()
            try:
                return run_task(run, task, *args, **kwargs)
            finally:
                _local.task = "(outside a task)"
                with _lock:
                    if name not in task_order:
                        task_order.append(name)
                    tasks[(name, host)] = tasks.get((name, host), 0.0) + time.perf_counter() - start
        runner.run_task = timed_task  # type: ignore[attr-defined]


def report(total: float, code: int) -> None:
    hosts = sorted(connections.keys() | {h for h, *_ in commands})
    print(f"mesh deploy (in-process, profiled): exit {code}, {total:.2f} s from start of Python "
          f"(imports {IMPORTED - STARTED:.2f} s)")
    print("phases (start, seconds):")
    for start, seconds, name in sorted(phases):
        print(f"  {start:6.2f}  {seconds:6.2f}  {name}")
    print("tasks (slowest host, seconds; remote calls per host):")
    for name in task_order:
        per_host = {h: s for (t, h), s in tasks.items() if t == name}
        slowest = max(per_host.values(), default=0.0)
        calls = {h: sum(1 for c in commands if c[0] == h and c[1] == name) for h in per_host}
        spread = sorted(set(calls.values()))
        print(f"  {slowest:6.2f}  calls/host {'-'.join(map(str, spread)) if spread else '0':>5}  {name}")
    print("per host: connections, remote calls, seconds in remote calls, bytes sent")
    for host in hosts:
        mine = [c for c in commands if c[0] == host]
        print(f"  {host:10} {connections.get(host, 0):3d} {len(mine):5d} {sum(c[3] for c in mine):8.2f} "
              f"{sum(c[4] for c in mine):10d}")
    playbook = sum(seconds for _, seconds, name in phases if name.endswith("run_playbook"))
    lockstep = sum(max((s for (t, _), s in tasks.items() if t == name), default=0.0) for name in task_order)
    busiest = max(hosts, key=lambda h: sum(c[3] for c in commands if c[0] == h), default=None)
    if busiest is not None:
        mine = [c for c in commands if c[0] == busiest]
        busy = sum(c[3] for c in mine)
        print(f"playbook {playbook:.2f} s; sum over tasks of the slowest host {lockstep:.2f} s (tasks wait for "
              f"every host); busiest host {busiest}: {len(mine)} remote calls, {busy:.2f} s, "
              f"{1000 * busy / max(1, len(mine)):.0f} ms per call")
    outside = [c for c in commands if c[1] == "(outside a task)"]
    if outside:
        print(f"remote calls outside playbook tasks (preflight, facts): {len(outside)} "
              f"({len(outside) / max(1, len(hosts)):.1f} per host)")
    print("slowest remote calls:")
    for host, task, what, seconds, _ in sorted(commands, key=lambda c: -c[3])[:8]:
        print(f"  {seconds:6.2f}  {host:8} {task[:40]:40}  {what[:80]}")


def main() -> int:
    install()
    global IMPORTED
    IMPORTED = time.perf_counter()
    from mesh.cli import run

    captured = io.StringIO()
    with redirect_stdout(captured):
        code = run(["deploy", sys.argv[1]])
    total = time.perf_counter() - STARTED
    text = io.StringIO()
    with redirect_stdout(text):
        report(total, code)
        if code != 0:
            print(captured.getvalue()[-3000:])
    print(text.getvalue(), end="")
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as handle:
            handle.write(text.getvalue())
    return 0


IMPORTED = STARTED

if __name__ == "__main__":
    sys.exit(main())
