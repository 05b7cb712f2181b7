"""`mesh_tracing` as the inventory says it: mesh's own collector, an outside Zipkin or OTLP collector by URL, the
sampling percentage; every mistake one error at its file, line and key, hostile URLs refused."""

from __future__ import annotations

import pytest
from meshvars_helpers import Fleet, find

from mesh.inventory.model import TracingSettings
from mesh.inventory.tracing import collector_url
from mesh.inventory.values import BadValue

CONSUL = "mesh_consul_url: http://10.77.0.2:8500\n"
WEB = "ansible_host: 10.77.0.11\nmesh_workloads:\n  - {service: web, port: 8080}\n"
FILE = "group_vars/all.yml"


def settings(value: str) -> TracingSettings | None:
    return Fleet(CONSUL + f"mesh_tracing: {value}\n").controller().host("vm1", WEB).build().settings.tracing


def errors(value: str) -> list:
    return Fleet(CONSUL + f"mesh_tracing: {value}\n").controller().host("vm1", WEB).errors()


def test_unset_means_no_tracing() -> None:
    assert Fleet(CONSUL).controller().host("vm1", WEB).build().settings.tracing is None
    assert settings("null") is None


def test_no_url_is_meshs_own_collector() -> None:
    assert settings("{sampling: 100}") == TracingSettings("mesh", 100.0)
    assert settings("{}") == TracingSettings("mesh", 1.0)  # sampling defaults to 1 %
    assert settings("{sampling: 0.25}") == TracingSettings("mesh", 0.25)
    assert settings("{sampling: '5%'}") == TracingSettings("mesh", 5.0)


def test_an_outside_collector_by_url() -> None:
    assert settings("{zipkin: 'http://zipkin.example:9411/api/v2/spans', sampling: 5}") == TracingSettings(
        "zipkin", 5.0, "http://zipkin.example:9411/api/v2/spans", "http", "zipkin.example", 9411, "/api/v2/spans")
    assert settings("{otlp: 'https://10.1.2.3'}") == TracingSettings(
        "otlp", 1.0, "https://10.1.2.3", "https", "10.1.2.3", 443, None)  # the default path is the config's
    assert settings("{zipkin: 'http://[fd00::7]:9411/'}") == TracingSettings(
        "zipkin", 1.0, "http://[fd00::7]:9411/", "http", "fd00::7", 9411, None)


@pytest.mark.parametrize(("value", "key", "fragment"), [
    ("{sampling: 101}", "mesh_tracing.sampling", "out of range"),
    ("{sampling: -1}", "mesh_tracing.sampling", "out of range"),
    ("{sampling: .nan}", "mesh_tracing.sampling", "a percentage"),
    ("{sampling: true}", "mesh_tracing.sampling", "a percentage"),
    ("{sampling: 0.00001}", "mesh_tracing.sampling", "4 decimals"),
    ("{sampeling: 5}", "mesh_tracing.sampeling", "did you mean 'sampling'"),
    ("{zipkin: 'http://a:9411', otlp: 'http://b:4318'}", "mesh_tracing.otlp", "not both"),
    ("'{sampling: 100}'", "mesh_tracing", "expected a mapping"),
    ("[100]", "mesh_tracing", "expected a mapping"),
    ("{zipkin: 'ftp://zipkin.example/'}", "mesh_tracing.zipkin", "http or https"),
    ("{zipkin: 'http://user:pw@zipkin.example/'}", "mesh_tracing.zipkin", "no userinfo"),
    ("{zipkin: 'http://zipkin.example/api?x=1'}", "mesh_tracing.zipkin", "no userinfo, query"),
    ("{zipkin: 'http://zipkin.example/api#x'}", "mesh_tracing.zipkin", "fragment"),
    ("{zipkin: 'http://zipkin.example:0/'}", "mesh_tracing.zipkin", "1-65535"),
    ("{zipkin: 'http://zipkin.example:70000/'}", "mesh_tracing.zipkin", "1-65535"),
    ("{zipkin: 'http://zipkin.example:09411/'}", "mesh_tracing.zipkin", "leading zero"),
    ("{zipkin: 'http://10.0.0.300/'}", "mesh_tracing.zipkin", "not a host name"),
    ("{zipkin: 'http://[10.0.0.1]/'}", "mesh_tracing.zipkin", "not an IPv6 address"),
    ("{zipkin: 'http://zipkin.example/a/../b'}", "mesh_tracing.zipkin", "'..'"),
    ("{zipkin: \"http://zipkin.example/\\nx\"}", "mesh_tracing.zipkin", "no userinfo"),
    ("{zipkin: 'http://zipkin.example/$(reboot)'}", "mesh_tracing.zipkin", "no userinfo"),
    ("{zipkin: 'http://zip kin/'}", "mesh_tracing.zipkin", "no userinfo"),
    ("{zipkin: 'http://zipkin.example/\"}'}", "mesh_tracing.zipkin", "no userinfo"),
    ("{otlp: 9411}", "mesh_tracing.otlp", "got 9411 (int)"),
])
def test_mistakes_are_one_error_at_their_key(value: str, key: str, fragment: str) -> None:
    found = errors(value)
    assert len(found) == 1, found
    find(found, FILE, 2, key, fragment)


def test_every_host_must_agree() -> None:
    found = (Fleet(CONSUL).controller("ctl1", "ansible_host: 10.77.0.3\nmesh_tracing: {sampling: 1}\n")
             .host("vm1", WEB + "mesh_tracing: {sampling: 100}\n").errors())
    find(found, "host_vars/vm1.yml", 4, "mesh_tracing", "must be the same on every host")


@pytest.mark.parametrize("url", ["http://zipkin", "https://zipkin.example.com:443/x/y_z~.-%20",
                                 "HTTP://Zipkin.Example:9411"])
def test_collector_url_takes_plain_urls(url: str) -> None:
    assert collector_url(url)[0] == url


@pytest.mark.parametrize("url", ["http://", "http:///x", "//zipkin/", "http://zipkin:/", "http://zip_kin/",
                                 "http://-zipkin/", "http://[fe80::1%eth0]/", "x" * 3000, "http://zipkin/%zz"])
def test_collector_url_refuses(url: str) -> None:
    with pytest.raises(BadValue):
        collector_url(url)
