"""The inventory's Consul variables: mesh_id (default: the trust domain; a DNS-label-like name, fullmatch),
mesh_consul_token_file and mesh_consul_ca_file (local paths, relative to the inventory's folder)."""

from __future__ import annotations

import pytest
from meshvars_helpers import Fleet, find


def fleet(extra: str = "") -> Fleet:
    return Fleet("mesh_trust_domain: lab.mesh\nmesh_consul_url: https://10.77.0.2:8501\n" + extra).controller()


def test_the_mesh_id_defaults_to_the_trust_domain_and_no_token_is_read() -> None:
    settings = fleet().build().settings
    assert settings.id == "lab.mesh" and settings.mesh_id is None
    assert settings.consul_token_file is None and settings.consul_ca_file is None


def test_token_and_ca_files_are_local_paths_from_the_inventorys_folder() -> None:
    settings = fleet("mesh_id: team-b\nmesh_consul_token_file: secrets/token\n"
                     "mesh_consul_ca_file: /etc/ssl/consul-ca.pem\n").build().settings
    assert settings.id == "team-b"
    assert settings.consul_token_file == "/srv/fleet/secrets/token"  # the inventory is /srv/fleet/inventory.yml
    assert settings.consul_ca_file == "/etc/ssl/consul-ca.pem"


@pytest.mark.parametrize("value", ['"Team"', '"team-b\\n"', '"-team"', '"team/b"', '"a b"', '"x' + "a" * 64 + '"',
                                   '""', "7", '"team\\u2028b"'])
def test_a_mesh_id_that_is_no_label_is_refused(value: str) -> None:
    errors = fleet(f"mesh_id: {value}\n").errors()
    find(errors, "group_vars/all.yml", 3, "mesh_id", "expected a mesh id")


@pytest.mark.parametrize("key", ["mesh_consul_token_file", "mesh_consul_ca_file"])
def test_a_file_path_with_a_line_break_is_refused(key: str) -> None:
    errors = fleet(f'{key}: "token\\nmore"\n').errors()
    find(errors, "group_vars/all.yml", 3, key, "file path")
