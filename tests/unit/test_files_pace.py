"""The pace of an xds proxy's last-known-good files (mesh.controller.lastgood): a files proxy's files follow its
snapshot at once; an xds proxy's only once the snapshot was quiet for a while, or at least every max delay."""

from __future__ import annotations

from mesh.controller.lastgood import FilesPace
from mesh.controller.snapshot import ProxySnapshot
from mesh.render import ProxyFiles, RenderedFile

FILES_KEY = ("vm1", "web-8080")
XDS_KEY = ("vm2", "api-9090")


def snap(host: str, proxy: str, endpoints: str) -> ProxySnapshot:
    files = (RenderedFile(f"/p/{proxy}/xds/eds.api.yaml", endpoints, "resource"),
             RenderedFile(f"/p/{proxy}/envoy.yaml", "bootstrap", "bootstrap"))
    return ProxySnapshot(host, ProxyFiles(proxy, f"/p/{proxy}", files, "b" * 64), "key")


def fleet(files_eps: str, xds_eps: str) -> dict:
    return {FILES_KEY: snap(*FILES_KEY, files_eps), XDS_KEY: snap(*XDS_KEY, xds_eps)}


def test_the_first_snapshot_is_released_at_once_and_a_files_proxy_always_follows() -> None:
    pace = FilesPace()
    first = fleet("a", "a")
    files, due = pace.paced(first, {XDS_KEY}, now=0.0)
    assert files == first and due is None
    second = fleet("b", "b")
    files, due = pace.paced(second, {XDS_KEY}, now=1.0)
    assert files[FILES_KEY] is second[FILES_KEY]
    assert files[XDS_KEY] is first[XDS_KEY]  # held back
    assert due == 1.0 + 10.0


def test_an_xds_proxys_files_follow_once_the_snapshot_is_quiet() -> None:
    pace = FilesPace()
    pace.paced(fleet("a", "a"), {XDS_KEY}, now=0.0)
    pace.paced(fleet("a", "b"), {XDS_KEY}, now=1.0)
    files, due = pace.paced(fleet("a", "b"), {XDS_KEY}, now=10.9)
    assert files[XDS_KEY].xds != fleet("a", "b")[XDS_KEY].xds and due == 11.0
    files, due = pace.paced(fleet("a", "b"), {XDS_KEY}, now=11.0)
    assert files[XDS_KEY].version == fleet("a", "b")[XDS_KEY].version and due is None


def test_a_snapshot_that_keeps_changing_reaches_the_files_at_the_max_delay() -> None:
    pace = FilesPace()
    pace.paced(fleet("a", "a"), {XDS_KEY}, now=0.0)
    released_at = None
    for step in range(1, 80):
        files, _due = pace.paced(fleet("a", f"v{step}"), {XDS_KEY}, now=float(step))
        if files[XDS_KEY].version == fleet("a", f"v{step}")[XDS_KEY].version:
            released_at = step
            break
    assert released_at == 61  # first change at 1 s, max delay 60 s


def test_going_back_to_the_held_version_cancels_the_wait_and_a_proxy_gone_is_forgotten() -> None:
    pace = FilesPace()
    pace.paced(fleet("a", "a"), {XDS_KEY}, now=0.0)
    pace.paced(fleet("a", "b"), {XDS_KEY}, now=1.0)
    files, due = pace.paced(fleet("a", "a"), {XDS_KEY}, now=2.0)
    assert due is None and files[XDS_KEY].version == fleet("a", "a")[XDS_KEY].version
    pace.paced({FILES_KEY: snap(*FILES_KEY, "a")}, {XDS_KEY}, now=3.0)
    assert XDS_KEY not in pace.held
