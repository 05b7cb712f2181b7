"""The controller's pushes against fake hosts (mesh.testing.fake_ctl): only the changed files, only to the hosts
that need them, each distinct file set validated once, a refusal retried only for another snapshot, nothing sent
without the lock, an unreachable host reconnected later, a proxy the deploy has not laid out left alone."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh.config.errors import EnvoyRejectedConfig
from mesh.controller.endpoints import Endpoint, ServiceEndpoints
from mesh.controller.metrics import ControllerMetrics
from mesh.controller.pusher import Pusher
from mesh.controller.snapshot import KnownEndpoints, build_snapshot
from mesh.controller.spec import ControllerSpec
from mesh.render import ProxyFiles
from mesh.testing.fake_ctl import (
    FakeCtlHost,
    FakeCtlTransport,
    controller_spec,
    host_spec,
    proxy_spec,
    web_files,
)

EDS = "xds/eds.upstream-api.yaml"


def up(found: Mapping[str, tuple[Endpoint, ...]]) -> KnownEndpoints:
    """What the controller knows when Consul lists these instances of each service, all up."""
    return {service: ServiceEndpoints(service, endpoints, endpoints) for service, endpoints in found.items()}


@dataclass
class Fleet:
    spec: ControllerSpec
    hosts: dict[str, FakeCtlHost]
    transport: FakeCtlTransport
    validated: list[ProxyFiles]
    pusher: Pusher
    metrics: ControllerMetrics

    def round(self, known: Mapping[str, tuple[Endpoint, ...]], may_push: Callable[[], bool] = lambda: True) -> None:
        self.pusher.round(build_snapshot(self.spec, up(known)), may_push)

    def applies(self, host: str) -> list[dict[str, list[str]]]:
        return self.hosts[host].applied


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    """vm1 and vm2 each run a web proxy calling api; vm3 runs one the deploy has not laid out yet."""
    specs, hosts = [], {}
    for name in ("vm1", "vm2", "vm3"):
        files = web_files(tmp_path / name / "web")
        specs.append(host_spec(name, (proxy_spec(files),)))
        hosts[name] = FakeCtlHost(name)
        if name != "vm3":
            hosts[name].add_proxy(files)
    spec = controller_spec(tuple(specs))
    validated: list[ProxyFiles] = []
    transport = FakeCtlTransport(hosts)
    metrics = ControllerMetrics()
    pusher = Pusher(transport, validated.append, metrics)
    pusher.set_hosts(spec.hosts)
    return Fleet(spec, hosts, transport, validated, pusher, metrics)


def test_hosts_running_the_snapshot_get_nothing(fleet: Fleet) -> None:
    fleet.round({})
    assert fleet.applies("vm1") == fleet.applies("vm2") == []
    assert [host.calls for host in fleet.hosts.values()] == [["state"]] * 3
    assert fleet.metrics.value("mesh_controller_hosts_behind") == 1  # vm3: not deployed yet, nothing sent


def test_only_the_changed_endpoint_file_goes_to_each_host_once(fleet: Fleet) -> None:
    known = {"api": (Endpoint("10.0.0.12", 21001),)}
    fleet.round(known)
    for name in ("vm1", "vm2"):
        [moved] = fleet.applies(name)
        assert list(moved.values()) == [[EDS]]
        assert "10.0.0.12" in fleet.hosts[name].files[next(iter(moved))][EDS]
    assert fleet.hosts["vm3"].calls == ["state"]  # its proxy is the deploy's to lay out first

    fleet.round(known)  # the same snapshot again: nothing to send, no state asked again
    assert [len(fleet.applies(name)) for name in ("vm1", "vm2")] == [1, 1]
    assert fleet.hosts["vm1"].calls == ["state", "apply"]
    assert fleet.metrics.value("mesh_controller_pushes_total", {"result": "ok"}) == 2


def test_each_plan_file_set_is_validated_once_and_endpoint_changes_need_no_other(fleet: Fleet) -> None:
    fleet.round({"api": (Endpoint("10.0.0.12", 21001),)})
    fleet.round({"api": (Endpoint("10.0.0.13", 21001),)})
    assert [len(fleet.applies(name)) for name in ("vm1", "vm2")] == [2, 2]
    assert sorted(files.proxy_dir for files in fleet.validated) == sorted(
        proxy.proxy_dir for host in fleet.spec.hosts[:2] for proxy in host.proxies)


def test_a_refused_snapshot_is_retried_only_when_the_snapshot_changes(fleet: Fleet) -> None:
    proxy = fleet.spec.hosts[0].proxies[0].name
    fleet.hosts["vm1"].refuse.add(proxy)
    fleet.round({"api": (Endpoint("10.0.0.12", 21001),)})
    fleet.round({"api": (Endpoint("10.0.0.12", 21001),)})
    assert fleet.hosts["vm1"].calls.count("apply") == 1
    assert fleet.metrics.value("mesh_controller_pushes_total", {"result": "refused"}) == 1

    fleet.hosts["vm1"].refuse.clear()
    fleet.round({"api": (Endpoint("10.0.0.13", 21001),)})
    assert fleet.hosts["vm1"].calls.count("apply") == 2
    assert "10.0.0.13" in fleet.hosts["vm1"].files[proxy][EDS]


def test_files_the_controllers_envoy_refuses_are_never_sent(tmp_path: Path, fleet: Fleet) -> None:
    def refuse(files: ProxyFiles) -> None:
        raise EnvoyRejectedConfig(files.proxy, "envoy --mode validate refused the files: [critical] bad")

    pusher = Pusher(fleet.transport, refuse)
    pusher.set_hosts(fleet.spec.hosts)
    pusher.round(build_snapshot(fleet.spec, up({"api": (Endpoint("10.0.0.12", 21001),)})), lambda: True)
    assert fleet.applies("vm1") == fleet.applies("vm2") == []
    assert set(pusher.refused) == {("vm1", fleet.spec.hosts[0].proxies[0].name),
                                   ("vm2", fleet.spec.hosts[1].proxies[0].name)}


def test_nothing_is_sent_when_the_lock_is_not_held_right_before_the_push(fleet: Fleet) -> None:
    asked: list[bool] = []

    def may_push() -> bool:
        asked.append(False)
        return False

    fleet.round({"api": (Endpoint("10.0.0.12", 21001),)}, may_push)
    assert len(asked) == 2  # vm1 and vm2, each right before its push
    assert fleet.applies("vm1") == fleet.applies("vm2") == []


def test_an_unreachable_host_is_behind_and_reached_again_later(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    fleet.pusher.clock = lambda: now[0]
    fleet.pusher.links.clear()
    fleet.pusher.set_hosts(fleet.spec.hosts)
    fleet.transport.down.add("vm2")
    known = {"api": (Endpoint("10.0.0.12", 21001),)}
    fleet.round(known)
    assert fleet.applies("vm1") and not fleet.applies("vm2")
    assert fleet.metrics.value("mesh_controller_hosts_behind") == 2

    fleet.transport.down.clear()
    fleet.round(known)  # still backing off
    assert not fleet.applies("vm2")
    now[0] += 60
    fleet.round(known)
    assert fleet.applies("vm2") and fleet.metrics.value("mesh_controller_hosts_behind") == 1


def test_a_proxy_whose_bootstrap_on_the_host_is_not_the_specs_is_left_to_the_deploy(fleet: Fleet) -> None:
    proxy = fleet.spec.hosts[0].proxies[0].name
    fleet.hosts["vm1"].files[proxy]["envoy.yaml"] = "an older bootstrap\n"
    fleet.round({"api": (Endpoint("10.0.0.12", 21001),)})
    assert fleet.applies("vm1") == [] and len(fleet.applies("vm2")) == 1


def test_files_the_spec_lacks_are_left_to_the_deploy(fleet: Fleet) -> None:
    proxy = fleet.spec.hosts[0].proxies[0].name
    fleet.hosts["vm1"].files[proxy]["xds/eds.gone.yaml"] = "old\n"
    fleet.round({})
    assert fleet.hosts["vm1"].files[proxy]["xds/eds.gone.yaml"] == "old\n"  # mesh.cleanup removes it
    assert fleet.applies("vm1") == []


def test_a_deploys_newer_files_stay_and_only_the_endpoints_follow_consul(fleet: Fleet) -> None:
    """A deploy stopped halfway leaves a host with files newer than the controllers' spec: never reverted."""
    proxy = fleet.spec.hosts[0].proxies[0].name
    fleet.hosts["vm1"].files[proxy]["xds/cds.yaml"] = "# written by a newer deploy\n"
    fleet.round({})
    assert fleet.applies("vm1") == []
    fleet.round({"api": (Endpoint("10.0.0.13", 21001),)})
    assert fleet.hosts["vm1"].files[proxy]["xds/cds.yaml"] == "# written by a newer deploy\n"
    assert "10.0.0.13" in fleet.hosts["vm1"].files[proxy][EDS]
    assert fleet.applies("vm1") == [{proxy: [EDS]}]


def test_a_slow_host_does_not_hold_back_the_others_or_the_loop(fleet: Fleet) -> None:
    fleet.hosts["vm2"].hold = threading.Event()
    snapshot = build_snapshot(fleet.spec, up({"api": (Endpoint("10.0.0.12", 21001),)}))
    first = fleet.pusher.round(snapshot, lambda: True, wait_s=0.2)
    assert first.pushed == 1 and "vm2" in first.behind and len(fleet.applies("vm1")) == 1
    newer = build_snapshot(fleet.spec, up({"api": (Endpoint("10.0.0.13", 21001),)}))
    fleet.pusher.round(newer, lambda: True, wait_s=0.2)  # vm2 still busy: skipped, vm1 gets the newer files
    assert len(fleet.applies("vm1")) == 2 and fleet.hosts["vm2"].calls.count("apply") == 1

    fleet.hosts["vm2"].hold.set()
    fleet.pusher.inflight["vm2"].result(timeout=10)
    last = fleet.pusher.round(newer, lambda: True, wait_s=5)
    assert "vm2" not in last.behind and "10.0.0.13" in fleet.hosts["vm2"].files[fleet.spec.hosts[1].proxies[0].name][EDS]
