"""The variables a task sees and Jinja2 over them: rendering arguments, `when`, `loop`, `changed_when`.
It owns precedence and expression evaluation; it must not run modules or reach hosts.

Precedence, lowest first (Ansible's order for what mesh supports): inventory vars, play vars, task vars,
registered results, the loop item, extra vars.
"""

from __future__ import annotations

import json
import threading
from collections import ChainMap
from collections.abc import Iterator, Mapping
from typing import Any

from jinja2 import TemplateSyntaxError
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError

from mesh.inventory.sandbox import BoundedSandbox
from mesh.inventory.templating import compile_template, is_template, make_environment, render_template

TRUE_WORDS = ("yes", "on", "1", "true", "y", "t")


class ExpressionError(Exception):
    """A template or expression that cannot be rendered (undefined variable, syntax error...)."""


def to_bool(value: Any) -> bool:
    """Ansible's `bool` filter: yes/on/true/1 (any case) are true, everything else false."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in TRUE_WORDS


def _result_test(key: str) -> Any:
    def test(value: Any) -> bool:
        return bool(isinstance(value, Mapping) and value.get(key))
    return test


def _succeeded(value: Any) -> bool:
    return isinstance(value, Mapping) and not value.get("failed")


def task_environment() -> BoundedSandbox:
    """The native, sandboxed Jinja2 of the inventory plus a few filters and tests playbooks use everywhere."""
    env = make_environment()
    env.keep_trailing_newline = True  # `content: "{{ x }}\n"` keeps its newline, as in Ansible
    env.filters.update(bool=to_bool, to_json=json.dumps, mandatory=lambda value: value)
    env.tests.update(changed=_result_test("changed"), failed=_result_test("failed"),
                     skipped=_result_test("skipped"), succeeded=_succeeded, success=_succeeded)
    return env


class Templar:
    """Renders values and evaluates conditions in a scope (any Mapping); compiled templates are cached."""

    def __init__(self) -> None:
        self.env = task_environment()
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _compile(self, source: str) -> Any:
        with self._lock:
            if source not in self._cache:
                try:
                    self._cache[source] = compile_template(self.env, source)
                except TemplateSyntaxError as exc:
                    raise ExpressionError(f"Jinja2 syntax error in {source!r}: {exc.message}") from None
                except (RecursionError, MemoryError):
                    raise ExpressionError(f"{source[:80]!r}: the template is nested too deeply to read") from None
            return self._cache[source]

    def render(self, value: Any, scope: Mapping[str, Any]) -> Any:
        """value with every template string rendered (recursively in lists and dicts), native types kept."""
        if isinstance(value, str):
            return self._render_string(value, scope) if is_template(value) else value
        if isinstance(value, list):
            return [self.render(item, scope) for item in value]
        if isinstance(value, Mapping):
            return {key: self.render(item, scope) for key, item in value.items()}
        return value

    def _render_string(self, source: str, scope: Mapping[str, Any]) -> Any:
        template = self._compile(source)
        try:
            return render_template(self.env, template, WithGlobals(scope, self.env.globals))
        except UndefinedError as exc:
            raise ExpressionError(f"{source!r}: {exc.message}") from None
        except SecurityError as exc:
            raise ExpressionError(f"{source[:80]!r}: refused by mesh's sandbox: {exc}") from None
        except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
            raise ExpressionError(f"{source!r}: {type(exc).__name__}: {exc}") from None

    def condition(self, condition: Any, scope: Mapping[str, Any]) -> bool:
        """One `when`-style condition: a bool as is, an expression (bare, as Ansible writes it) evaluated."""
        if isinstance(condition, bool):
            return condition
        text = str(condition).strip()
        if is_template(text):  # `when: "{{ x }}"` is deprecated in Ansible but still read
            return to_bool(self._render_string(text, scope))
        result = self._render_string("{{ (" + text + ") }}", scope)
        return bool(result) if not isinstance(result, str) else to_bool(result)

    def all_true(self, conditions: tuple[Any, ...], scope: Mapping[str, Any]) -> bool:
        return all(self.condition(condition, scope) for condition in conditions)


class WithGlobals(Mapping[str, Any]):
    """A scope that falls back to Jinja2's globals (range, dict...): shared contexts do not add them."""

    def __init__(self, scope: Mapping[str, Any], globals_: Mapping[str, Any]) -> None:
        self._scope = scope
        self._globals = globals_

    def __getitem__(self, key: str) -> Any:
        if key in self._scope:
            return self._scope[key]
        return self._globals[key]

    def __contains__(self, key: object) -> bool:
        return key in self._scope or key in self._globals

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(self._globals), **dict.fromkeys(self._scope)})

    def __len__(self) -> int:
        return sum(1 for _ in self)


class RenderedLayer(Mapping[str, Any]):
    """Play or task vars: template values rendered when read, in the scope they are part of."""

    def __init__(self, values: Mapping[str, Any], templar: Templar) -> None:
        self._values = values
        self._templar = templar
        self.scope: Mapping[str, Any] = {}
        self._active: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if key in self._active:
            raise ExpressionError(f"the variable {key!r} refers to itself")
        self._active.add(key)
        try:
            return self._templar.render(value, self.scope)
        finally:
            self._active.discard(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def task_scope(templar: Templar, inventory: Mapping[str, Any], play_vars: Mapping[str, Any],
               task_vars: Mapping[str, Any], registered: Mapping[str, Any], extra: Mapping[str, Any],
               item: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """The variables of one task on one host (one loop item), highest precedence first in the chain."""
    play_layer = RenderedLayer(play_vars, templar)
    task_layer = RenderedLayer(task_vars, templar)
    layers: list[Any] = [dict(extra), dict(item or {}), dict(registered), task_layer, play_layer, inventory]
    scope: ChainMap[str, Any] = ChainMap(*layers)
    play_layer.scope = scope
    task_layer.scope = scope
    return scope
