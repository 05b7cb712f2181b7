"""Jinja2's immutable sandbox with bounds: no value it makes grows past MAX_ITEMS, no integer past MAX_INT_BITS,
no render takes more than MAX_STEPS steps (loop iterations, calls, operators). Inventory values are data, so a
template that would hang mesh or eat its memory is refused (BoundExceeded, a SecurityError) before it does.

It owns the environment and its limits; it must not know inventories, files or keys (the callers place errors).
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_ITEMS = 1_000_000  # characters of a string, items of a list or mapping made while rendering
MAX_INT_BITS = 4096  # about 1,233 decimal digits: every number an inventory needs, and far more
MAX_STEPS = 2_000_000  # loop iterations, calls, operators and items of values checked, in one render
MAX_LIPSUM_WORDS = 10_000
_STEP_FILTER = "mesh_counted_loop"  # wraps the iterable of every `for`, so nested loops are counted
# Filters whose arguments say how large the result is (a width, a count).
_SIZED_FILTERS = frozenset({"center", "indent", "wordwrap", "truncate", "batch", "slice"})
# A width or precision in a format string ('%9999999s', '{:>9999999}') or `*` (taken from the arguments).
_FORMAT_NUMBER = re.compile(r"\d{7,}")
_PERCENT_STAR = re.compile(r"%[-#0 +]*(?:\d*\.)?\*")
_NESTED_FIELD = re.compile(r":[^{}]*\{")  # '{0:{1}}': a width taken from the arguments


class BoundExceeded(SecurityError):
    """A template that would make a value too large or run too long; the message says which bound."""


@dataclass
class _Budget:
    steps: int = 0

    def charge(self, count: int = 1) -> None:
        self.steps += count
        if self.steps > MAX_STEPS:
            raise BoundExceeded(f"the template takes more than {MAX_STEPS} steps (loops inside loops?)")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("mesh_template_budget", default=None)


@contextmanager
def render_budget() -> Iterator[None]:
    """A fresh step budget for one render (per thread: the deploy runner renders on several)."""
    token = _BUDGET.set(_Budget())
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _charge(count: int = 1) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(count)


def check_size(value: Any) -> Any:
    """value itself, or BoundExceeded when it weighs more than MAX_ITEMS (characters of its strings plus items of
    its lists and mappings, nested ones included: a list of one huge list repeated is as large as its text)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > MAX_INT_BITS:
            raise BoundExceeded(f"the template makes a number of more than {MAX_INT_BITS} bits")
    elif isinstance(value, (str, bytes)):
        if len(value) > MAX_ITEMS:
            raise BoundExceeded(f"the template makes a value of more than {MAX_ITEMS} characters")
    elif isinstance(value, _CONTAINERS):
        _check_weight(value)
    return value


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _check_weight(value: Any) -> None:
    weight = 0
    stack = [value]
    while stack:
        item = stack.pop()
        _charge()  # walking is work too: a value read again and again uses up the render's steps
        if isinstance(item, (str, bytes)):
            weight += len(item)
        elif isinstance(item, _CONTAINERS):
            weight += len(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
        else:
            weight += 1
        if weight > MAX_ITEMS:
            raise BoundExceeded(f"the template makes a value of more than {MAX_ITEMS} characters and items")


def _sized(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


def _check_format(template: Any) -> None:
    """A format string may not ask for a width or precision beyond MAX_ITEMS, nor take one from its arguments
    with `*` (str.format's nested `{:{}}` is checked where its arguments are known, wrap_str_format)."""
    if not isinstance(template, str):
        return
    if _FORMAT_NUMBER.search(template) or _PERCENT_STAR.search(template):
        raise BoundExceeded(f"the format string asks for a width or precision over {MAX_ITEMS} (or a `*` width)")


def _check_numbers(args: Iterable[Any]) -> None:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_ITEMS:
            raise BoundExceeded(f"a width or count of {arg if arg.bit_length() < 64 else 'a huge number'} is over "
                                f"the bound of {MAX_ITEMS}")


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse `**`, `*`, `+` and `%` whose result would pass the bounds, before it is computed."""
    if operator == "**":
        _check_power(left, right)
    elif operator == "*":
        _check_product(left, right)
    elif operator == "+":
        sizes = (_sized(left), _sized(right))
        if sizes[0] is not None and sizes[1] is not None and sizes[0] + sizes[1] > MAX_ITEMS:
            raise BoundExceeded(f"`+` would make a value of more than {MAX_ITEMS} characters or items")
    elif operator == "%" and isinstance(left, str):
        _check_format(left)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_power(base: Any, exponent: Any) -> None:
    if not (_is_int(base) and _is_int(exponent)) or exponent < 0 or base in (0, 1, -1):
        return  # floats overflow with an error; negative exponents make floats
    if max(base.bit_length(), 1) * exponent > MAX_INT_BITS:
        raise BoundExceeded(f"`**` would make a number of more than {MAX_INT_BITS} bits")


def _check_product(left: Any, right: Any) -> None:
    if _is_int(left) and _is_int(right):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise BoundExceeded(f"`*` would make a number of more than {MAX_INT_BITS} bits")
        return
    for sequence, count in ((left, right), (right, left)):
        size = _sized(sequence)
        if size is not None and (_is_int(count) or isinstance(count, bool)) and size * int(count) > MAX_ITEMS:
            raise BoundExceeded(f"`*` would make a value of more than {MAX_ITEMS} characters or items")


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        worst = (len(text) // max(len(old), 1) + 1) * len(new) + len(text)
        if worst > MAX_ITEMS:
            raise BoundExceeded(f"`replace` could make a string of more than {MAX_ITEMS} characters")


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """function, counting a step, refusing oversized arguments before and oversized results after."""
    passes_extra = getattr(function, "jinja_pass_arg", None) is not None

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _charge()
        value_at = 1 if passes_extra else 0
        extra = args[value_at + 1:]
        if name in _SIZED_FILTERS:
            _check_numbers([*extra, *kwargs.values()])
        if name == "format" and len(args) > value_at:
            _check_format(args[value_at])
        if name == "replace" and len(args) > value_at + 2:
            _check_replace(args[value_at], args[value_at + 1], args[value_at + 2])
        return check_size(function(*args, **kwargs))

    return bounded


def _counted_loop(iterable: Any) -> Iterator[Any]:
    for item in iterable:
        _charge()
        yield item


def _lipsum(lipsum: Callable[..., Any]) -> Callable[..., Any]:
    def bounded(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:  # Jinja2's names
        if not (_is_int(n) and _is_int(max)) or n * max > MAX_LIPSUM_WORDS:
            raise BoundExceeded(f"lipsum() of more than {MAX_LIPSUM_WORDS} words")
        return lipsum(n, html, min, max)

    return bounded


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox (no attribute of Python internals, no mutation of values) with mesh's bounds.

    Operators that can make huge values are intercepted (and so never folded into constants at compile time).
    """

    intercepted_binops = frozenset({"**", "*", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _bounded_filter(name, function) for name, function in self.filters.items()}
        self.filters[_STEP_FILTER] = _counted_loop
        self.globals["lipsum"] = _lipsum(cast(Callable[..., Any], self.globals["lipsum"]))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _charge()
        check_binop(operator, left, right)
        return check_size(super().call_binop(context, operator, left, right))

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _charge()
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, (str, bytes, list, tuple)):  # ljust(n), center(n), zfill(n), expandtabs(n)...
            _check_numbers([*args, *kwargs.values()])
            if getattr(obj, "__name__", None) == "replace":
                _check_replace(owner, *(list(args) + [None, None])[:2])
        return check_size(super().call(context, obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _charge()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _charge()
        return super().getitem(obj, argument)

    def mesh_join(self, parts: Iterable[Any]) -> str:
        """Jinja2's `~` (BoundedCodeGenerator routes it here): the joined text, bounded."""
        _charge()
        return str(check_size("".join(str(part) for part in parts)))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        template = getattr(value, "__self__", None)
        _check_format(template)
        formatter = super().wrap_str_format(value)
        if formatter is None or not (isinstance(template, str) and _NESTED_FIELD.search(template)):
            return formatter

        def bounded(*args: Any, **kwargs: Any) -> str:
            # format_map takes them from a mapping
            mapped = [item for arg in args if isinstance(arg, dict) for item in arg.values()]
            _check_numbers([*args, *kwargs.values(), *mapped])
            return formatter(*args, **kwargs)

        return bounded


class BoundedCodeGenerator(CodeGenerator):
    """Compiles `~` to the environment's mesh_join, so that doubling a string in a loop meets the bound."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.mesh_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def count_loops(tree: nodes.Template) -> nodes.Template:
    """Route the iterable of every `for` (and so of loops inside loops) through the step counter."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, _STEP_FILTER, [], [], None, None, lineno=loop.lineno)
    return tree


def bounded_concat(chunks: Iterable[Any], concat: Callable[[Iterable[Any]], Any]) -> Any:
    """concat(chunks) with the rendered output counted: more than MAX_ITEMS characters is refused."""
    total = 0

    def counted() -> Iterator[Any]:
        nonlocal total
        for chunk in chunks:
            _charge()
            if isinstance(chunk, str):
                total += len(chunk)
                if total > MAX_ITEMS:
                    raise BoundExceeded(f"the template renders more than {MAX_ITEMS} characters")
            yield chunk

    return check_size(concat(counted()))
