"""The bounded sandbox templates render in: what would hang mesh or eat its memory is refused quickly, with a
message saying which bound; what inventories and playbooks really write still renders."""

from __future__ import annotations

import time
from typing import Any

import pytest
from jinja2.exceptions import SecurityError

from mesh.deploy.variables import ExpressionError, Templar, WithGlobals
from mesh.inventory.sandbox import MAX_ITEMS, BoundedSandbox, BoundExceeded, check_binop
from mesh.inventory.templating import compile_template, make_environment, render_template


def render(source: str, **scope: Any) -> Any:
    env = make_environment()
    return render_template(env, compile_template(env, source), WithGlobals(scope, env.globals))


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{{ 7**999999999 }}", "`**`"),
        ("{{ 2 ** 100000 }}", "`**`"),
        ("{{ 'a' * 3000000000 }}", "`*`"),
        ("{{ [1] * 3000000000 }}", "`*`"),
        ("{{ 3000000000 * 'a' }}", "`*`"),
        ("{{ 10**1000 * 10**1000 * 10**1000 }}", "`*`"),
        ("{{ ('a' * 999999) + ('b' * 999999) }}", "`+`"),
        ("{{ ('a' * 999999) ~ ('b' * 999999) }}", "characters"),
        ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "steps"),
        ("{% set ns = namespace(x='a') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}", "more"),
        ("{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = ns.x + ns.x %}{% endfor %}", "more than"),
        ("{{ [[1] * 1000000] * 1000000 }}", "characters and items"),
        ("{{ '%999999999s' % 'a' }}", "format"),
        ("{{ '%*s' % (999999999, 'a') }}", "format"),
        ("{{ '{:>999999999}'.format(1) }}", "format"),
        ("{{ '{0:{1}}'.format('a', 3000000000) }}", "width or count"),
        ("{{ '{x:{w}}'.format_map({'x': 'a', 'w': 3000000000}) }}", "width or count"),
        ("{{ '%999999999s' | format('a') }}", "format"),
        ("{{ 'a'.ljust(3000000000) }}", "width or count"),
        ("{{ 'a' | center(3000000000) }}", "width or count"),
        ("{{ 'a' | indent(3000000000, true) }}", "width or count"),
        ("{{ ('a' * 1000000) | replace('a', 'bb') }}", "replace"),
        ("{{ ('a' * 1000000).replace('a', 'bb') }}", "replace"),
        ("{{ lipsum(100000) }}", "lipsum"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses"),
    ],
)
def test_unbounded_templates_are_refused_quickly(source: str, words: str) -> None:
    started = time.monotonic()
    with pytest.raises(BoundExceeded) as caught:
        render(source)
    assert words in str(caught.value)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ 2 ** 10 }}", 1024), ("{{ 8000 + 80 }}", 8080), ("{{ 'ab' ~ 'c' }}", "abc"), ("{{ [1] * 3 }}", [1, 1, 1]),
        ("{{ '%05d' % 42 }}", "00042"), ("{{ '{:>4}'.format(7) }}", "   7"), ("{{ 'a,b' | replace(',', ';') }}", "a;b"),
        ("{{ x | default(5000000) }}", 5000000), ("{{ range(3) | list }}", [0, 1, 2]),
        ("{% for i in range(1000) %}{% endfor %}done", "done"), ("{{ 'x' | center(5) }}", "  x  "),
        ("{{ dict(timeout=3600000) }}", {"timeout": 3600000}), ("{{ lipsum(2) | length > 10 }}", True),
        ("{{ '%ss' % 3600000 }}", "3600000s"), ("{{ '{}s'.format(3600000) }}", "3600000s"),
        ("{{ '%s-%s' | format(1, 3600000) }}", "1-3600000"), ("{{ '{0:{1}}'.format('a', 3) }}", "a  "),
    ],
)
def test_ordinary_templates_render(source: str, expected: Any) -> None:
    assert render(source) == expected


def test_the_sandbox_is_immutable() -> None:
    env = make_environment()
    assert isinstance(env, BoundedSandbox)
    with pytest.raises(SecurityError):
        render("{{ [1, 2].append(3) }}")
    with pytest.raises(SecurityError):
        render("{{ ().__class__ }}")


def test_operators_are_not_folded_at_compile_time() -> None:
    # Jinja2 folds constant expressions while compiling: an intercepted operator must never be.
    env = make_environment()
    started = time.monotonic()
    compile_template(env, "{{ 7**999999999 }}")
    assert time.monotonic() - started < 5


def test_check_binop_lets_floats_and_small_values_through() -> None:
    check_binop("**", 2.0, 100000)
    check_binop("*", "a", MAX_ITEMS)
    with pytest.raises(BoundExceeded):
        check_binop("*", "ab", MAX_ITEMS)


def test_the_deploy_templar_is_bounded_too() -> None:
    with pytest.raises(ExpressionError) as caught:
        Templar().render("{{ 'a' * 3000000000 }}", {})
    assert "sandbox" in str(caught.value)
    assert Templar().render("{{ x }}-{{ y }}", {"x": 1, "y": "z"}) == "1-z"
