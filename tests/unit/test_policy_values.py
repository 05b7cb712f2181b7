"""The single values of a traffic policy, as the inventory, the JSON and the `mesh route`/`mesh fault` options
read them: durations, percentages, counts, names, methods, zones."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.inventory.policy_values import (
    check_cookie_value,
    check_header_name,
    check_header_value,
    check_method,
    check_path,
    check_zone,
    parse_count,
    parse_millis,
    parse_percent,
)
from mesh.inventory.values import BadValue


@pytest.mark.parametrize(("text", "millis"), [
    ("500ms", 500), ("2s", 2000), ("1.5s", 1500), ("0.001s", 1), ("1m30s", 90_000), ("1h", 3_600_000),
    ("1h1m1s1ms", 3_661_001), (" 2s ", 2000), ("24h", 86_400_000), ("1s500ms", 1500),
])
def test_durations(text: str, millis: int) -> None:
    assert parse_millis(text) == millis


@pytest.mark.parametrize(("value", "fragment"), [
    ("0s", "longer than zero"), ("0ms", "longer than zero"), ("-1s", "a duration such as"), ("2", "a duration such as"),
    (2, "write the unit"), (2.5, "write the unit"), (True, "a duration such as"), (None, "a duration such as"),
    ("1s1h", "a duration such as"), ("1m1m", "a duration such as"), ("ms", "a duration such as"),
    ("1.5ms", "whole number of milliseconds"), ("24h1ms", "at most 24h"), ("9" * 13 + "h", "a duration such as"),
    ("2 s", "a duration such as"), ("2S", "a duration such as"), ("1d", "a duration such as"), ("", "a duration"),
])
def test_bad_durations(value: Any, fragment: str) -> None:
    with pytest.raises(BadValue, match=fragment):
        parse_millis(value)


@pytest.mark.parametrize(("value", "percent"), [
    (5, 5.0), (5.5, 5.5), ("5%", 5.0), ("5.5%", 5.5), ("5", 5.0), (" 7 % ", 7.0), (0, 0.0), (100, 100.0),
    ("0.0001%", 0.0001), (12.3456, 12.3456),
])
def test_percentages(value: Any, percent: float) -> None:
    assert parse_percent(value) == percent


@pytest.mark.parametrize("value", [101, -1, "101%", "-5%", "5%%", "%", True, None, [5], float("nan"), float("inf"),
                                   10**400, 12.34567, "1e1", "0x10"])
def test_bad_percentages(value: Any) -> None:
    with pytest.raises(BadValue, match="percentage"):
        parse_percent(value)


def test_counts_take_ini_strings_and_refuse_booleans() -> None:
    assert parse_count("42") == 42 and parse_count(42) == 42 and parse_count(" 7 ") == 7
    for bad in (True, False, "042", "4.2", 4.0, "-1", "", None, "1e3"):
        with pytest.raises(BadValue, match="an integer"):
            parse_count(bad)
    with pytest.raises(BadValue, match="out of range"):
        parse_count(10**30, 0, 100)


def test_names_and_values() -> None:
    assert check_header_name("X-Canary") == "x-canary"
    assert check_header_value(1) == "1" and check_header_value("a b") == "a b"
    assert check_method("patch") == "PATCH"
    assert check_path("/a?b=c") == "/a?b=c"
    assert check_cookie_value("abc=") == "abc="
    assert check_zone("eu-west-1a") == "eu-west-1a" and check_zone("a" * 63) == "a" * 63
    for reader, bad in [(check_header_name, ":path"), (check_header_name, ""), (check_header_name, "x y"),
                        (check_header_value, True), (check_header_value, " x"), (check_header_value, "a\nb"),
                        (check_header_value, ""), (check_method, "FETCH"), (check_method, 1), (check_path, "a"),
                        (check_path, "/a b"), (check_cookie_value, "a;b"), (check_cookie_value, ""),
                        (check_zone, "a" * 64), (check_zone, "_a"), (check_zone, "a b"), (check_zone, 1)]:
        with pytest.raises(BadValue):
            reader(bad)
