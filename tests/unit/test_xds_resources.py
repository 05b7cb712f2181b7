"""A proxy's xds files as ADS resources (mesh.xds.resources): every template's "@type" known to the descriptor
pool, the round trip files -> Any -> JSON equal to the files' resources with the sources rewritten, the
certificate left a file, the trust bundle inline, content-hash versions and the memo."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.config.xds import ads_source
from mesh.controller.endpoints import Endpoint, ServiceEndpoints
from mesh.controller.snapshot import build_snapshot, proxy_snapshot
from mesh.render import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
    RenderedFile,
    resource_name,
)
from mesh.testing.fake_ctl import controller_spec, host_spec, proxy_spec, web_files
from mesh.xds import resources as module
from mesh.xds.resources import XdsConversionError, ads_resources, packed, unpacked

TEMPLATES = Path(__file__).resolve().parents[2] / "templates" / "envoy"
BUNDLE = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def template_types() -> list[str]:
    found = set()
    for template in TEMPLATES.glob("*.j2"):
        found.update(re.findall(r"type\.googleapis\.com/[A-Za-z0-9_.]+", template.read_text()))
    return sorted(found)


def test_every_type_a_template_names_is_known_to_the_descriptor_pool() -> None:
    types = template_types()
    assert len(types) > 20 and LISTENER_TYPE in types
    # a fresh interpreter: only what mesh.xds.resources imports counts
    code = ("import json, sys; from mesh.xds.resources import missing_types; "
            "print(json.dumps(missing_types(json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(types)], capture_output=True, text=True,
                          check=True, timeout=60)
    assert json.loads(done.stdout) == []


def test_a_type_no_module_registers_is_reported_missing() -> None:
    assert module.missing_types(["type.googleapis.com/envoy.extensions.filters.http.nothing.v3.Nothing"]) == [
        "type.googleapis.com/envoy.extensions.filters.http.nothing.v3.Nothing"]


def snapshot(tmp_path: Path, known: dict[str, ServiceEndpoints] | None = None) -> Any:
    files = web_files(tmp_path / "web")
    proxy = proxy_spec(files)
    return proxy_snapshot("vm1", proxy, known or {}) if known else \
        build_snapshot(controller_spec((host_spec("vm1", (proxy,)),)), {})[("vm1", proxy.name)]


def file_resources(snap: Any) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for file in snap.xds.values():
        for resource in yaml.safe_load(file.content)["resources"]:
            found[(resource["@type"], resource_name(resource))] = resource
    return found


def sources_to_ads(value: Any, keep: str) -> Any:
    """The expectation, written out: every path config source to ADS but the SDS source of secret `keep`."""
    if isinstance(value, list):
        return [sources_to_ads(item, keep) for item in value]
    if isinstance(value, dict):
        if value.get("name") == keep and "sds_config" in value:
            return value
        if "path_config_source" in value:
            return ads_source()
        return {key: sources_to_ads(item, keep) for key, item in value.items()}
    return value


def test_files_to_any_to_json_is_the_files_resources_with_the_sources_on_ads(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    served = ads_resources(snap, "web-vm1-1", BUNDLE)
    in_files = file_resources(snap)
    [certificate] = [name for (url, name), item in in_files.items() if url == SECRET_TYPE and "tls_certificate" in item]
    expected = {}
    for (url, name), resource in in_files.items():
        if url == SECRET_TYPE and name == certificate:
            continue  # stays a file: its key never leaves the host
        item = sources_to_ads(resource, certificate)
        if url == SECRET_TYPE:
            item = {"@type": url, "name": name, "validation_context": {"trusted_ca": {"inline_string": BUNDLE}}}
        expected[(url, name)] = item
    got = {(url, name): unpacked(data) for url, named in served.by_type.items() for name, data in named.items()}
    assert set(got) == set(expected)
    for key, item in expected.items():
        assert got[key] == unpacked(packed(item)), key  # the same message (JSON forms of defaults differ)
    sources = _sources(list(got.values()))
    assert sources  # the certificate's SDS source only
    assert all(source["path_config_source"]["path"].endswith(f"/sds.{certificate}.yaml") for source in sources)
    assert "watched_directory" not in json.dumps(got[(SECRET_TYPE, "mesh-ca")])
    listeners = got[(LISTENER_TYPE, "outbound-api")]
    assert listeners["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["config_source"] == ads_source()


def _sources(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, list):
        return [found for item in value for found in _sources(item)]
    if isinstance(value, dict):
        own = [value] if "path_config_source" in value else []
        return own + [found for item in value.values() for found in _sources(item)]
    return []


def test_versions_are_content_hashes_and_an_endpoint_change_moves_only_eds(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    first = ads_resources(snap, "n", BUNDLE)
    module._memo.clear()  # another controller: computed afresh
    module._shared.clear()
    second = ads_resources(snap, "n", BUNDLE)
    assert first.versions == second.versions and first.by_type == second.by_type
    moved = proxy_snapshot("vm1", proxy_spec(snap.files), {"api": ServiceEndpoints(
        "api", (Endpoint("10.0.0.9", 9),), (Endpoint("10.0.0.9", 9),))})
    third = ads_resources(moved, "n", BUNDLE)
    changed = {url for url in first.versions if first.versions[url] != third.versions[url]}
    assert changed == {ENDPOINT_TYPE}
    assert ads_resources(snap, "n", BUNDLE + "\n").versions[SECRET_TYPE] != first.versions[SECRET_TYPE]
    assert set(first.versions) == {LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, SECRET_TYPE}


def test_a_file_is_converted_once(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    first = ads_resources(snap, "a", BUNDLE)
    second = ads_resources(snap, "b", BUNDLE)
    assert first.by_type[LISTENER_TYPE]["inbound"] is second.by_type[LISTENER_TYPE]["inbound"]
    assert second.node_id == "b"


def test_a_file_that_cannot_be_streamed_names_the_proxy_and_the_file(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    path, lds = next((path, file) for path, file in snap.xds.items() if path.endswith("lds.yaml"))
    body = yaml.safe_load(lds.content)
    body["resources"][0]["no_such_field"] = 1
    broken = RenderedFile(lds.path, yaml.safe_dump(body), "resource")
    files = replace(snap.files, files=tuple(broken if file.path == lds.path else file for file in snap.files.files))
    with pytest.raises(XdsConversionError, match=rf"proxy {snap.proxy}: .*lds.yaml.*no_such_field"):
        ads_resources(replace(snap, files=files), "n", BUNDLE)
    not_a_response = RenderedFile(lds.path, "- just a list\n", "resource")
    files = replace(snap.files, files=tuple(not_a_response if file.path == lds.path else file
                                            for file in snap.files.files))
    with pytest.raises(XdsConversionError, match="not a DiscoveryResponse"):
        ads_resources(replace(snap, files=files), "n", BUNDLE)
    assert path == "xds/lds.yaml"
