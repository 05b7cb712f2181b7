"""`mesh metrics targets`: one file_sd entry per proxy, naming it by labels; IPv6 addresses in brackets."""

from __future__ import annotations

from telemetry_samples import telemetry_mesh

from mesh.telemetry.targets import file_sd, proxy_targets


def test_file_sd_has_one_entry_per_proxy_with_its_labels() -> None:
    entries = file_sd(proxy_targets(telemetry_mesh()), "lab.mesh")
    assert [entry["targets"] for entry in entries] == [
        ["10.77.0.11:20000"], ["10.77.0.12:20000"], ["10.77.0.12:20001"], ["[fd00::20]:20000"]]
    assert entries[3]["labels"] == {
        "__metrics_path__": "/stats/prometheus", "mesh_id": "lab.mesh", "mesh_service": "api", "mesh_version": "v2",
        "mesh_proxy": "api-api-v2-1", "mesh_host": "dock1", "mesh_kind": "container",
        "mesh_instance": "api-dock1-api-v2-1"}
    assert [(e["labels"]["mesh_proxy"], e["labels"]["mesh_kind"]) for e in entries[:3]] == [
        ("web-8080", "vm"), ("api-9090", "vm"), ("db-5432", "vm")]


def test_a_controller_without_workloads_is_no_target() -> None:
    assert "ctl1" not in {target.host for target in proxy_targets(telemetry_mesh())}
