"""Readers of single values: every name rule is a full match (no trailing newline slips through `$`), values
that reach hosts hold only the characters their reader on the host expects, and local paths may hold `../`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from mesh.inventory.values import (
    BadValue,
    JumpHop,
    check_address,
    check_container_name,
    check_dns_label,
    check_health_path,
    check_host_name,
    check_local_path,
    check_trust_domain,
    check_url,
    check_user_name,
    check_version,
    parse_cert_ttl,
    parse_duration,
    parse_port,
    parse_proxy_jump,
    parse_ssh_args,
)

HOSTILE_SUFFIXES = ["\n", "\r", "\0", "'", '"', "$(reboot)", "`reboot`", "/../x", "\u2028", "\u2029", "\u0085",
                    " x", "\\"]
READERS = {
    check_dns_label: "web", check_version: "v1", check_container_name: "api-v2-1", check_trust_domain: "lab.mesh",
    check_address: "10.0.0.1", check_host_name: "vm1", check_user_name: "deploy", parse_port: "8080",
    parse_duration: "5s", check_health_path: "/healthz",
}


@pytest.mark.parametrize("suffix", HOSTILE_SUFFIXES, ids=repr)
@pytest.mark.parametrize("reader", list(READERS), ids=lambda reader: reader.__name__)
def test_no_reader_takes_a_hostile_suffix(reader: Any, suffix: str) -> None:
    good = READERS[reader]
    reader(good)
    with pytest.raises(BadValue):
        reader(good + suffix)


@pytest.mark.parametrize("name", ["vm1", "web-01", "db_2", "host.example.com", "10.0.0.1", "_internal"])
def test_host_names_mesh_manages(name: str) -> None:
    assert check_host_name(name) == name


@pytest.mark.parametrize("name", ["-oProxyCommand=x", ".hidden", "a..b", "vm 1", "vm/1", "vm:1", "x" * 254, ""])
def test_host_names_refused(name: str) -> None:
    with pytest.raises(BadValue, match="letters, digits"):
        check_host_name(name)


@pytest.mark.parametrize("path", ["/healthz", "/", "/health/ready", "/healthz?full=1&verbose", "/a%2Fb",
                                  "/v1/status:check", "/~user/x", "/a;b=c"])
def test_health_paths_accepted(path: str) -> None:
    assert check_health_path(path) == path


@pytest.mark.parametrize("path", ["healthz", "/a b", "/a\tb", "/a'b", '/a"b', "/a(b)", "/a$b", "/a*b", "/a\\b",
                                  "/a/../b", "/..", "/a%zz", "/\u00e9", "/a\u2028", "/a#frag", "/a`b`"])
def test_health_paths_refused(path: str) -> None:
    with pytest.raises(BadValue, match="HTTP path"):
        check_health_path(path)


@pytest.mark.parametrize("path", ["../ca", "~/mesh/../state", "/srv/mesh state", "relative/dir"])
def test_local_paths_may_climb(path: str) -> None:
    assert check_local_path(path, "a folder path") == path


@pytest.mark.parametrize("path", ["a\nb", "a\0b", "a\rb", "a\u2028b", "a\u202eb", "  "])
def test_local_paths_refuse_control_characters(path: str) -> None:
    with pytest.raises(BadValue):
        check_local_path(path, "a folder path")


def test_ipv6_scope_holds_no_newline() -> None:
    assert check_address("fe80::1%eth0") == "fe80::1%eth0"
    with pytest.raises(BadValue, match="scope"):
        check_address("fe80::1%eth0\nflush ruleset")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8500\n", "http://10.0.0.1:85\n00", "http://a b:8500",
                                 "http://10.0.0.1:8500/'", "http://10.0.0.1:8500/$(x)", "http://h:8500/../x"])
def test_urls_refused(url: str) -> None:
    with pytest.raises(BadValue):
        check_url(url)


def test_cert_ttl_bounds() -> None:
    assert parse_cert_ttl("24h") == timedelta(hours=24)
    assert parse_cert_ttl("10m") == timedelta(minutes=10)
    assert parse_cert_ttl("1m") == timedelta(minutes=1)  # the controllers renew it every 30 s
    assert parse_cert_ttl("90d") == timedelta(days=90)
    for value in ("59s", "30s", "91d", "365d"):
        with pytest.raises(BadValue, match="from 1m to 90d"):
            parse_cert_ttl(value)


def test_huge_numbers_are_bad_values_not_crashes() -> None:
    with pytest.raises(BadValue):
        parse_duration("9" * 5000 + "d")
    with pytest.raises(BadValue):
        parse_duration("999999999d999999999h")  # timedelta overflows
    with pytest.raises(BadValue):
        parse_port("9" * 5000)


@pytest.mark.parametrize(
    ("value", "hops"),
    [("bastion", (JumpHop("bastion"),)), ("u@b:2222", (JumpHop("b", 2222, "u"),)),
     ("u@[::1]:2222,h2", (JumpHop("::1", 2222, "u"), JumpHop("h2"))), ("10.0.0.1", (JumpHop("10.0.0.1"),))],
)
def test_proxy_jump_hops(value: str, hops: tuple[JumpHop, ...]) -> None:
    assert parse_proxy_jump(value) == hops
    assert parse_ssh_args(f"-o ProxyJump={value}").proxy_jump == value


@pytest.mark.parametrize("value", ["@@@", "user@host:notaport", "h:0", "h:99999", "u@", ":22", "a,,b",
                                   "ssh://u@h:22", "h;reboot", "u$(x)@h"])
def test_proxy_jump_refused(value: str) -> None:
    with pytest.raises(BadValue, match="ProxyJump"):
        parse_ssh_args(f"-o ProxyJump={value}")


def test_ssh_arguments_are_one_line() -> None:
    with pytest.raises(BadValue, match="one line"):
        parse_ssh_args("-o 'ProxyJump=b\nProxyCommand=x'")
    assert parse_ssh_args("-o ProxyJump=none").proxy_jump is None
