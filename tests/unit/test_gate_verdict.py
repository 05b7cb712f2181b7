"""The health gate's verdict (mesh.deploy.steps.gate.verdict): what it judges after a proxy's change, pure."""

from __future__ import annotations

import pytest

from mesh.config.compute import LOCAL_APP_CLUSTER, upstream_cluster_name
from mesh.deploy.steps.gate import Health, verdict
from mesh.inventory.model import Connection, ManagedHost, Mesh, MeshSettings, Upstream, Workload
from mesh.plan.build import PlanInputs, build_plan
from mesh.plan.model import ProxyPlan

TD = "test.mesh"
DB = upstream_cluster_name("db")
CACHE = upstream_cluster_name("cache")


def _api(*upstreams: str) -> ProxyPlan:
    api = Workload("vm2", 0, "api", 9090, TD, upstreams=tuple(Upstream(s, 19100 + n) for n, s in enumerate(upstreams)))
    others = tuple(Workload("vm3", n, service, 7000 + n, TD) for n, service in enumerate(upstreams))
    hosts = (ManagedHost("vm2", "vm", Connection("10.0.0.12"), (api,)),
             *((ManagedHost("vm3", "vm", Connection("10.0.0.13"), others),) if others else ()))
    mesh = Mesh(MeshSettings(trust_domain=TD), hosts,
                services={"api": (api,), **{w.service: (w,) for w in others}})
    return build_plan(mesh, PlanInputs(b"root", "00")).host("vm2").proxy("api-9090")


def _health(planned: ProxyPlan, **healthy: int) -> Health:
    listeners = frozenset({planned.config.inbound.name, *(listener.name for listener in planned.config.outbound)})
    return Health(True, listeners, planned.bootstrap_sha256, {k.replace("_", "-"): v for k, v in healthy.items()})


@pytest.fixture(scope="module")
def with_db() -> ProxyPlan:
    return _api("db")


def test_a_serving_proxy_no_less_healthy_than_before_passes(with_db: ProxyPlan) -> None:
    before = _health(with_db, local_app=1, upstream_db=1)
    assert verdict(with_db, before, _health(with_db, local_app=1, upstream_db=1)) == []


def test_an_app_or_a_kept_upstream_less_healthy_than_before_fails(with_db: ProxyPlan) -> None:
    before = _health(with_db, local_app=1, upstream_db=1)
    assert LOCAL_APP_CLUSTER == "local-app"
    assert verdict(with_db, before, _health(with_db, local_app=0, upstream_db=1)) == [
        "its app was healthy before the change and is not now"]
    assert verdict(with_db, before, _health(with_db, local_app=1, upstream_db=0)) == [
        f"{DB}: 0 healthy host(s), 1 before"]
    assert verdict(with_db, before, _health(with_db, local_app=1)) == [f"{DB}: 0 healthy host(s), 1 before"], \
        "a kept upstream whose cluster vanished is judged"


def test_an_upstream_the_plan_removed_is_not_judged() -> None:
    without = _api()
    before = Health(True, frozenset(), "", {"local-app": 1, DB: 1})
    assert verdict(without, before, _health(without, local_app=1)) == []


def test_an_unplanned_cluster_still_there_is_judged() -> None:
    """A cluster Envoy still has (not removed by the plan) must not lose healthy hosts either."""
    without = _api()
    before = Health(True, frozenset(), "", {"local-app": 1, CACHE: 2})
    assert verdict(without, before, _health(without, local_app=1, upstream_cache=1)) == [
        f"{CACHE}: 1 healthy host(s), 2 before"]


def test_a_version_cluster_the_plan_shrank_may_lose_the_hosts_it_moved() -> None:
    """An instance the inventory moved from v1 to v2 leaves api's v1 cluster on purpose: the gate asks for no more
    healthy hosts than the plan put there, and still fails one that lost a host the plan kept."""
    web = Workload("vm1", 0, "web", 8080, TD, upstreams=(Upstream("api", 19101),))
    apis = (Workload("vm2", 0, "api", 9090, TD, version="v1"), Workload("vm3", 0, "api", 9090, TD, version="v2"))
    hosts = (ManagedHost("vm1", "vm", Connection("10.0.0.11"), (web,)),
             ManagedHost("vm2", "vm", Connection("10.0.0.12"), apis[:1]),
             ManagedHost("vm3", "vm", Connection("10.0.0.13"), apis[1:]))
    mesh = Mesh(MeshSettings(trust_domain=TD), hosts, services={"web": (web,), "api": apis})
    planned = build_plan(mesh, PlanInputs(b"root", "00")).host("vm1").proxy("web-8080")
    v1 = next(cluster.name for cluster in planned.config.clusters if cluster.name.endswith(".v1"))
    listeners = frozenset({planned.config.inbound.name, *(listener.name for listener in planned.config.outbound)})
    before = Health(True, listeners, planned.bootstrap_sha256, {"local-app": 1, v1: 2})
    assert verdict(planned, before, Health(True, listeners, planned.bootstrap_sha256, {"local-app": 1, v1: 1})) == []
    assert verdict(planned, before, Health(True, listeners, planned.bootstrap_sha256, {"local-app": 1, v1: 0})) == [
        f"{v1}: 0 healthy host(s), 2 before"]
