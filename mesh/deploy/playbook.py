"""Reads playbooks in Ansible's syntax into typed plays and tasks, refusing what mesh does not run with the
file, line and key (exit 4). It owns the syntax; it must not render templates or run anything.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from mesh.deploy.errors import PlaybookError
from mesh.deploy.modules import ModuleRegistry, registry
from mesh.deploy.pacing import PacingError, Serial, parse_max_fail_percentage, parse_serial
from mesh.errors import InventoryErrors, Origin
from mesh.inventory.located import Located, Problems
from mesh.inventory.yamlfile import load_yaml_file
from mesh.suggest import did_you_mean

PLAY_KEYS = ("name", "hosts", "vars", "tasks", "handlers", "gather_facts", "become", "become_user", "serial",
             "max_fail_percentage")
TASK_KEYS = ("name", "when", "notify", "loop", "loop_control", "tags", "register", "become", "become_user",
             "changed_when", "failed_when", "ignore_errors", "args", "vars", "check_mode", "no_log")
HANDLER_KEYS = (*TASK_KEYS, "listen")
UNSUPPORTED = {
    "block": "blocks are not supported yet; list the tasks one by one",
    "rescue": "blocks are not supported yet", "always": "blocks are not supported yet",
    "include_tasks": "includes are not supported; list the tasks in the play",
    "import_tasks": "imports are not supported; list the tasks in the play",
    "import_playbook": "imports are not supported; run each playbook", "roles": "roles are not supported",
    "pre_tasks": "list these tasks under `tasks`", "post_tasks": "list these tasks under `tasks`",
    "with_items": "write `loop:` instead", "delegate_to": "delegation is not supported",
}

EMPTY: Mapping[str, Any] = MappingProxyType({})
T = TypeVar("T")


@dataclass(frozen=True)
class Task:
    """One task (or handler): the module to run, its raw arguments, and Ansible's task keywords."""

    name: str
    module: str  # the registered name (`copy` for `ansible.builtin.copy`)
    args: Mapping[str, Any]
    origin: Origin
    when: tuple[Any, ...] = ()
    notify: tuple[str, ...] = ()
    loop: Any = None  # a list, a Jinja2 expression, or None
    loop_var: str = "item"
    tags: frozenset[str] = frozenset()
    register: str | None = None
    changed_when: tuple[Any, ...] | None = None
    failed_when: tuple[Any, ...] | None = None
    ignore_errors: bool = False
    vars: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    listen: tuple[str, ...] = ()
    has_name: bool = True


@dataclass(frozen=True)
class Play:
    name: str
    hosts: str
    origin: Origin
    vars: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    tasks: tuple[Task, ...] = ()
    handlers: tuple[Task, ...] = ()
    serial: Serial | None = None  # None: every host of the play at once
    max_fail_percentage: float | None = None  # None: go on while a host is left (a batch: while one did not fail)


@dataclass(frozen=True)
class Playbook:
    path: Path
    plays: tuple[Play, ...] = field(default_factory=tuple)


def load_playbook(path: str | Path, modules: ModuleRegistry | None = None) -> Playbook:
    """Read and check a playbook file. Raises InventoryErrors (exit 4) listing every problem found."""
    document = load_yaml_file(str(path))
    root = Located(document.data, document.marks.origin, "", document.marks)
    problems = Problems()
    plays = _Reader(modules or registry, problems).playbook(root)
    if problems.errors:
        raise InventoryErrors(problems.errors)
    return Playbook(Path(path).absolute(), tuple(plays))


class _Reader:
    def __init__(self, modules: ModuleRegistry, problems: Problems) -> None:
        self.modules = modules
        self.problems = problems

    def error(self, where: Located, message: str, hint: str | None = None) -> None:
        self.problems.add(PlaybookError(where.origin, message, key=where.key or None, hint=hint))

    def key_error(self, where: Located, name: str, message: str, hint: str | None = None) -> None:
        key = f"{where.key}.{name}" if where.key else name
        self.problems.add(PlaybookError(where.key_origin(name), message, key=key, hint=hint))

    def playbook(self, root: Located) -> list[Play]:
        if not isinstance(root.value, list):
            self.error(root, "a playbook is a list of plays (each with `hosts:` and `tasks:`)")
            return []
        plays = []
        for index in range(len(root.value)):
            play = self.play(_child(root, index, f"play[{index}]"))
            if play is not None:
                plays.append(play)
        return plays

    def play(self, where: Located) -> Play | None:
        if not isinstance(where.value, dict):
            self.error(where, "a play is a mapping with `hosts:` and `tasks:`")
            return None
        self.check_keys(where, PLAY_KEYS)
        hosts = where.value.get("hosts")
        if isinstance(hosts, list):
            hosts = ",".join(str(host) for host in hosts)
        if not isinstance(hosts, str) or not hosts.strip():
            self.error(where, "a play needs `hosts:` (a group, a host or a pattern such as `vms:&web`)")
            return None
        name = where.value.get("name") or hosts
        return Play(
            name=str(name), hosts=hosts, origin=where.origin, vars=self.mapping(where, "vars"),
            tasks=self.tasks(where, "tasks", TASK_KEYS), handlers=self.tasks(where, "handlers", HANDLER_KEYS),
            serial=self.pacing(where, "serial", parse_serial),
            max_fail_percentage=self.pacing(where, "max_fail_percentage", parse_max_fail_percentage))

    def pacing(self, where: Located, key: str, parse: Callable[[Any], T]) -> T | None:
        """serial or max_fail_percentage, read when the playbook is (mesh does not template them)."""
        if where.value.get(key) is None:
            return None
        value = where.value[key]
        if isinstance(value, str) and "{{" in value:
            self.key_error(where, key, "mesh reads this keyword before any variable: write the value itself",
                           hint=f"or give it on the command line: --{key.replace('_', '-')}")
            return None
        try:
            return parse(value)
        except PacingError as exc:
            self.key_error(where, key, str(exc))
            return None

    def mapping(self, where: Located, key: str) -> Mapping[str, Any]:
        value = where.value.get(key)
        if value is None:
            return EMPTY
        if not isinstance(value, dict):
            self.key_error(where, key, "expected a mapping of variable names to values")
            return EMPTY
        return MappingProxyType(dict(value))

    def tasks(self, where: Located, key: str, allowed: tuple[str, ...]) -> tuple[Task, ...]:
        value = where.value.get(key)
        if value is None:
            return ()
        spot = where.child(key)
        if not isinstance(value, list):
            self.error(spot, f"`{key}` is a list of tasks")
            return ()
        found = (self.task(spot.child(index), allowed) for index in range(len(value)))
        return tuple(task for task in found if task is not None)

    def check_keys(self, where: Located, allowed: tuple[str, ...]) -> None:
        for name in where.value:
            if name in allowed:
                continue
            reason = UNSUPPORTED.get(str(name))
            self.key_error(where, str(name), reason or "not a key mesh knows here",
                           hint=None if reason else did_you_mean(str(name), allowed))

    def task(self, where: Located, allowed: tuple[str, ...]) -> Task | None:
        if not isinstance(where.value, dict):
            self.error(where, "a task is a mapping with one module (`copy:`, `template:`...) and its arguments")
            return None
        data: dict[str, Any] = where.value
        module_keys = [k for k in data if k not in allowed]
        spec = None
        for key in module_keys:
            found = self.modules.resolve(str(key))
            if found is not None and spec is None:
                spec, module_key = found, key
            elif found is not None:
                self.key_error(where, str(key), "a task runs one module; this one has several")
            elif str(key) in UNSUPPORTED:
                self.key_error(where, str(key), UNSUPPORTED[str(key)])
            else:
                names = self.modules.names()
                fqcns = [f"ansible.builtin.{name}" for name in names if "." not in name]
                hint = did_you_mean(str(key), [*allowed, *names, *fqcns])
                self.key_error(where, str(key), "not a module or task key mesh knows", hint=hint)
        if spec is None:
            if not module_keys:
                self.error(where, "the task names no module", hint="add one, e.g. `ansible.builtin.copy:`")
            return None
        args = self.args(where, module_key, spec.free_form, spec.params)
        return Task(
            name=str(data.get("name") or spec.name), module=spec.name, args=args, origin=where.origin,
            when=_conditions(data.get("when")), notify=_names(data.get("notify")),
            loop=data.get("loop"), loop_var=str((data.get("loop_control") or {}).get("loop_var", "item")),
            tags=frozenset(_names(data.get("tags"))), register=data.get("register"),
            changed_when=None if "changed_when" not in data else _conditions(data["changed_when"]),
            failed_when=None if "failed_when" not in data else _conditions(data["failed_when"]),
            ignore_errors=bool(data.get("ignore_errors", False)), vars=self.mapping(where, "vars"),
            listen=_names(data.get("listen")), has_name=bool(data.get("name")))

    def args(self, where: Located, key: str, free_form: str | None,
             params: frozenset[str] | None) -> Mapping[str, Any]:
        raw = where.value.get(key)
        args: dict[str, Any] = {}
        if isinstance(raw, str):
            args = _free_form(raw, free_form)
        elif isinstance(raw, dict):
            args = dict(raw)
        elif raw is not None:
            self.key_error(where, key, "module arguments are a mapping (or a `k=v` string)")
        extra = where.value.get("args")
        if isinstance(extra, dict):
            args = {**extra, **args}
        if params is not None:
            spot = where.child(key) if isinstance(raw, dict) else where
            for name in args:
                if name not in params:
                    self.key_error(spot, str(name), f"not an argument of `{key}`",
                                   hint=did_you_mean(str(name), params))
        return MappingProxyType(args)


def _child(where: Located, index: int, key: str) -> Located:
    child = where.child(index)
    return Located(child.value, child.origin, key, child.marks)


def _free_form(text: str, free_form: str | None) -> dict[str, Any]:
    """`src=a dest=b` as Ansible reads it; for command-like modules, the words that are not k=v are the cmd."""
    args: dict[str, Any] = {}
    rest: list[str] = []
    for word in shlex.split(text):
        name, eq, value = word.partition("=")
        if eq and name.isidentifier() and (free_form is None or name in ("chdir", "creates", "removes")):
            args[name] = value
        else:
            rest.append(word)
    if rest:
        args[free_form or "_raw_params"] = " ".join(shlex.quote(word) for word in rest) if free_form else rest
    return args


def _conditions(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _names(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(str(item) for item in value)
    if isinstance(value, str) and "," in value:
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return (str(value),)
