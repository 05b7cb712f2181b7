"""Renders Jinja2 expressions in inventory variables as Ansible would, with Jinja2's own filters and tests.

It owns rendering and refusing what needs Ansible (lookups, Ansible-only filters); it must not validate values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain, islice
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.nativetypes import NativeCodeGenerator
from jinja2.runtime import Undefined, new_context

from mesh.errors import InventoryError, Origin
from mesh.inventory.data import InventoryData, UnsafeText, Var
from mesh.inventory.located import sub_marks
from mesh.inventory.sandbox import (
    BoundedCodeGenerator,
    BoundedSandbox,
    BoundExceeded,
    bounded_concat,
    count_loops,
    render_budget,
)
from mesh.inventory.yamlfile import Marks
from mesh.suggest import did_you_mean

TEMPLATE_STARTS = ("{{", "{%", "{#")
ANSIBLE_LOOKUPS = ("lookup", "query", "q")
ANSIBLE_GLOBALS = ("omit", "now", "undef", "ansible_facts")
_UNDEFINED_NAME = re.compile(r"^'([^']+)' is undefined")

VarsOf = Callable[[str], Mapping[str, Var]]
MAGIC_NAMES = frozenset({"inventory_hostname", "inventory_hostname_short", "groups", "group_names", "hostvars"})


def is_template(value: Any) -> bool:
    """True when value is a string Ansible would template: it holds a Jinja2 block start and is not marked
    `!unsafe` (Ansible keeps those literally, whatever they hold)."""
    return (isinstance(value, str) and not isinstance(value, UnsafeText)
            and any(start in value for start in TEMPLATE_STARTS))


class _AnsibleNativeCodeGenerator(BoundedCodeGenerator, NativeCodeGenerator):
    # No constant folding: "{{ 8080 }}" must stay the int 8080, "{{ 80 }}{{ 80 }}" the string "8080".
    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: CodeGenerator._FinalizeInfo) -> Any:
        if isinstance(node, nodes.TemplateData):
            return node.as_const(frame.eval_ctx)
        raise nodes.Impossible()


def ansible_concat(values: Iterable[Any]) -> Any:
    """Ansible 2.19's result of a template: one expression keeps its native type, several make a string."""
    iterator = iter(values)
    head = list(islice(iterator, 2))
    if not head:
        return ""
    if len(head) == 1:
        return head[0]
    return "".join(str(value) for value in chain(head, iterator))


class _Environment(BoundedSandbox):
    code_generator_class = _AnsibleNativeCodeGenerator


def make_environment() -> BoundedSandbox:
    """Jinja2's immutable sandbox with mesh's bounds (sandbox.py): StrictUndefined, Jinja2's built-in filters
    and tests, no loader. Templates must be compiled with compile_template and rendered with render_template."""
    return _Environment(undefined=StrictUndefined, autoescape=False)


def compile_template(env: BoundedSandbox, source: str | nodes.Template) -> Any:
    """A template of env whose loops count against the render's step budget."""
    tree = env.parse(source) if isinstance(source, str) else source
    return env.from_string(count_loops(tree))


def render_template(env: BoundedSandbox, template: Any, scope: Mapping[str, Any]) -> Any:
    """The native result of template in scope, within the sandbox's bounds (BoundExceeded otherwise).

    MemoryError and RecursionError become BoundExceeded too: a template must never end mesh unexpectedly."""
    context = new_context(env, None, {}, scope, shared=True)  # type: ignore[arg-type]
    try:
        with render_budget():
            result = bounded_concat(template.root_render_func(context), ansible_concat)
    except MemoryError:
        raise BoundExceeded("the template needs more memory than mesh has") from None
    except RecursionError:
        raise BoundExceeded("the template recurses without end") from None
    _fail_on_undefined(result)
    return result


class Templating:
    """Renders the variables of one inventory host by host, lazily and once, as Ansible's templar does.

    vars_of(host) gives a host's merged variables (with origins); render(host, key) gives one rendered value.
    Errors are InventoryError naming the file, line and key of the expression at fault.
    """

    def __init__(self, data: InventoryData, vars_of: VarsOf) -> None:
        self._data = data
        self._vars_of = vars_of
        self._env = make_environment()
        self._raw: dict[str, Mapping[str, Var]] = {}
        self._rendered: dict[tuple[str, str], Any] = {}
        self._active: list[tuple[str, str]] = []
        self._groups = _groups_dict(data)
        self._compiled: dict[str, Any] = {}

    @property
    def inventory(self) -> InventoryData:
        return self._data

    def raw_vars(self, host: str) -> Mapping[str, Var]:
        if host not in self._raw:
            self._raw[host] = self._vars_of(host)
        return self._raw[host]

    def render(self, host: str, key: str) -> Any:
        """The rendered value of one variable of host (which must have it)."""
        slot = (host, key)
        if slot in self._rendered:
            return self._rendered[slot]
        var = self.raw_vars(host)[key]
        if slot in self._active:
            loop = " -> ".join(name for _, name in self._active[self._active.index(slot):]) + f" -> {key}"
            raise InventoryError(var.origin, f"the variable refers to itself through a loop: {loop}", key=key)
        self._active.append(slot)
        try:
            value = self.render_value(host, var.value, var.origin, key, var.marks)
        finally:
            self._active.pop()
        self._rendered[slot] = value
        return value

    def render_value(self, host: str, value: Any, origin: Origin, key: str, marks: Marks | None = None) -> Any:
        """Render value (recursively in lists and dicts) in host's scope; key and marks place the errors."""
        if isinstance(value, str):
            return self._render_string(host, value, origin, key) if is_template(value) else value
        if isinstance(value, list):
            return [
                self.render_value(host, item, _at(marks, index, origin), f"{key}[{index}]", sub_marks(marks, index))
                for index, item in enumerate(value)
            ]
        if isinstance(value, dict):
            return {
                name: self.render_value(host, item, _at(marks, name, origin), f"{key}.{name}", sub_marks(marks, name))
                for name, item in value.items()
            }
        return value

    def scope(self, host: str) -> Mapping[str, Any]:
        """The variables a template of host sees: its own (rendered on use) and Ansible's magic ones."""
        return _HostScope(self, host)

    def _render_string(self, host: str, source: str, origin: Origin, key: str) -> Any:
        template = self._compile(source, origin, key)
        try:
            return render_template(self._env, template, _HostScope(self, host))
        except InventoryError:
            raise
        except UndefinedError as exc:
            raise self._undefined(exc, host, origin, key) from None
        except SecurityError as exc:
            raise InventoryError(origin, f"the template is refused by mesh's sandbox: {exc}", key=key) from None
        except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
            raise InventoryError(origin, f"the template fails: {type(exc).__name__}: {exc}", key=key) from None

    def _compile(self, source: str, origin: Origin, key: str) -> Any:
        if source in self._compiled:
            return self._compiled[source]
        try:
            tree = self._env.parse(source)
            self._refuse_ansible_only(tree, origin, key)
            template = compile_template(self._env, tree)
        except TemplateSyntaxError as exc:
            raise InventoryError(origin, f"Jinja2 syntax error: {exc.message}", key=key) from None
        except (RecursionError, MemoryError):
            raise InventoryError(origin, "the template is nested too deeply to read", key=key) from None
        self._compiled[source] = template
        return template

    def _refuse_ansible_only(self, tree: nodes.Template, origin: Origin, key: str) -> None:
        for call in tree.find_all(nodes.Call):
            if isinstance(call.node, nodes.Name) and call.node.name in ANSIBLE_LOOKUPS:
                raise InventoryError(
                    origin,
                    f"`{call.node.name}(...)` is an Ansible lookup; mesh renders templates with Jinja2 alone",
                    key=key,
                    hint="write the value itself in the inventory",
                )
        for filter_node in tree.find_all(nodes.Filter):
            if filter_node.name not in self._env.filters:
                raise _unknown(origin, key, "filter", filter_node.name, self._env.filters)
        for test_node in tree.find_all(nodes.Test):
            if test_node.name not in self._env.tests:
                raise _unknown(origin, key, "test", test_node.name, self._env.tests)
        for name in tree.find_all(nodes.Name):
            if name.name in ANSIBLE_LOOKUPS or (name.name in ANSIBLE_GLOBALS and name.ctx == "load"):
                raise InventoryError(
                    origin, f"`{name.name}` is Ansible's own; mesh renders templates with Jinja2 alone", key=key
                )

    def _undefined(self, exc: UndefinedError, host: str, origin: Origin, key: str) -> InventoryError:
        message = str(exc.message or exc)
        match = _UNDEFINED_NAME.match(message)
        hint = None
        if match:
            hint = did_you_mean(match.group(1), list(_HostScope(self, host)))
            message = f"the template uses the undefined variable '{match.group(1)}'"
        else:
            message = f"the template uses an undefined value: {message}"
        return InventoryError(origin, message, key=key, hint=hint)


class _HostScope(Mapping[str, Any]):
    """A host's variables as templates see them: rendered only when a template reads them."""

    def __init__(self, templating: Templating, host: str) -> None:
        self._templating = templating
        self._host = host

    def _magic(self) -> dict[str, Callable[[], Any]]:
        templating = self._templating
        host = self._host
        return {
            "inventory_hostname": lambda: host,
            "inventory_hostname_short": lambda: host.split(".")[0],
            "groups": lambda: templating._groups,
            "group_names": lambda: _group_names(templating._data, host),
            "hostvars": lambda: _HostVars(templating),
        }

    def __getitem__(self, key: str) -> Any:
        if key in MAGIC_NAMES:  # as in Ansible, the inventory cannot override them
            return self._magic()[key]()
        if key in self._templating.raw_vars(self._host):
            return self._templating.render(self._host, key)
        return self._templating._env.globals[key]

    def __contains__(self, key: object) -> bool:
        return (
            key in self._templating.raw_vars(self._host) or key in self._magic() or key in self._templating._env.globals
        )

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._templating.raw_vars(self._host), *self._magic()]))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _HostVars(Mapping[str, Any]):
    """`hostvars`: every host's scope, by name."""

    def __init__(self, templating: Templating) -> None:
        self._templating = templating

    def __getitem__(self, host: str) -> Any:
        if host not in self._templating._data.hosts:
            raise KeyError(host)
        return _HostScope(self._templating, host)

    def __iter__(self) -> Iterator[str]:
        return iter(self._templating._data.hosts)

    def __len__(self) -> int:
        return len(self._templating._data.hosts)


def _fail_on_undefined(value: Any) -> None:
    """Native rendering does not str() its result, so an undefined value must be made to fail here."""
    if isinstance(value, Undefined):
        str(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _fail_on_undefined(item)
    elif isinstance(value, dict):
        for item in value.values():
            _fail_on_undefined(item)


def _unknown(origin: Origin, key: str, kind: str, name: str, known: Iterable[str]) -> InventoryError:
    return InventoryError(
        origin,
        f"'{name}' is not a Jinja2 {kind}; Ansible's own {kind}s (and lookups) are not available in mesh",
        key=key,
        hint=did_you_mean(name, known),
    )


def _at(marks: Marks | None, step: Any, fallback: Origin) -> Origin:
    child = sub_marks(marks, step)
    return child.origin if child is not None else fallback


def _groups_dict(data: InventoryData) -> dict[str, list[str]]:
    """`groups`: every group and all hosts in it or in its descendants, in Ansible's order."""
    return {name: hosts_under(data, name) for name in data.groups}


def hosts_under(data: InventoryData, group: str) -> list[str]:
    """Ansible's `groups[group]`: the hosts of the group and of its descendants, in Ansible's order."""
    seen_groups: set[str] = set()
    hosts: dict[str, None] = {}
    stack = [group]
    while stack:
        name = stack.pop()
        if name in seen_groups or name not in data.groups:
            continue
        seen_groups.add(name)
        hosts.update(dict.fromkeys(data.groups[name].hosts))
        stack.extend(reversed(data.groups[name].children))
    if group == "all":
        hosts.update(dict.fromkeys(data.hosts))
    return list(hosts)


def host_groups(data: InventoryData, host: str) -> list[str]:
    """Every group host is in, directly or through children, `all` included."""
    found: dict[str, None] = {}
    stack = list(data.hosts[host].groups) if host in data.hosts else []
    while stack:
        name = stack.pop()
        if name in found or name not in data.groups:
            continue
        found[name] = None
        stack.extend(data.groups[name].parents)
    found["all"] = None
    return list(found)


def _group_names(data: InventoryData, host: str) -> list[str]:
    return sorted(name for name in host_groups(data, host) if name != "all")
