"""ADS resources shared across nodes (issue 23: 1000 proxies converge fast): proxies whose streamed files are the
same get one assembly (by_type, versions, digests) under their own node id, equal to what each computes alone."""

from __future__ import annotations

from pathlib import Path

from mesh.controller.endpoints import Endpoint, ServiceEndpoints
from mesh.controller.snapshot import build_snapshot
from mesh.render import ENDPOINT_TYPE
from mesh.testing.fake_ctl import controller_spec, host_spec, proxy_spec, web_files
from mesh.xds import resources as module
from mesh.xds.resources import ProxyResources, ads_resources

BUNDLE = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def alone(snapshot: object, node_id: str, bundle: str) -> ProxyResources:
    """What a controller with empty memos computes."""
    module._memo.clear()
    module._shared.clear()
    return ads_resources(snapshot, node_id, bundle)  # type: ignore[arg-type]


def test_nodes_with_the_same_files_share_one_assembly_equal_to_their_own(tmp_path: Path) -> None:
    proxy = proxy_spec(web_files(tmp_path / "web"))
    spec = controller_spec(tuple(host_spec(f"vm{index}", (proxy,)) for index in range(3)))
    for count in (1, 3):
        chosen = tuple(Endpoint(f"10.0.0.{index + 1}", 9000 + index) for index in range(count))
        snapshot = build_snapshot(spec, {"api": ServiceEndpoints("api", chosen, chosen)})
        served = [ads_resources(snapshot[(f"vm{index}", proxy.name)], f"web-vm{index}", BUNDLE) for index in range(3)]
        assert [item.node_id for item in served] == ["web-vm0", "web-vm1", "web-vm2"]
        assert served[1].by_type is served[0].by_type and served[2].versions is served[0].versions
        for index, item in enumerate(served):
            own = alone(snapshot[(f"vm{index}", proxy.name)], f"web-vm{index}", BUNDLE)
            assert item == own
            assert {url: dict(named) for url, named in item.by_type.items()} == \
                {url: dict(named) for url, named in own.by_type.items()}


def test_another_endpoint_set_or_bundle_is_not_shared(tmp_path: Path) -> None:
    proxy = proxy_spec(web_files(tmp_path / "web"))
    spec = controller_spec((host_spec("vm1", (proxy,)),))
    one = (Endpoint("10.0.0.1", 9000),)
    two = (Endpoint("10.0.0.2", 9000),)
    first = ads_resources(build_snapshot(spec, {"api": ServiceEndpoints("api", one, one)})[("vm1", proxy.name)],
                          "n", BUNDLE)
    moved = build_snapshot(spec, {"api": ServiceEndpoints("api", two, two)})[("vm1", proxy.name)]
    second = ads_resources(moved, "n", BUNDLE)
    assert second.versions[ENDPOINT_TYPE] != first.versions[ENDPOINT_TYPE]
    assert second == alone(moved, "n", BUNDLE)
    rebundled = ads_resources(moved, "n", BUNDLE + "\n")
    assert rebundled.versions != second.versions and rebundled == alone(moved, "n", BUNDLE + "\n")
