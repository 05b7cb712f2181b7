"""--limit as Ansible reads it: every group of the user's inventory (children included), patterns, `@FILE`
(a retry file), compared with ansible-core's own subset on the same inventory."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.deploy.hostvars import inventory_vars
from mesh.deploy.patterns import limit_hosts
from mesh.errors import UsageError
from mesh.inventory.loader import load_inventory

INVENTORY = """
all:
  children:
    webservers:
      hosts: {web1: {}, web2: {}, web3: {}}
    dbservers:
      hosts: {db1: {}, db2: {}}
    prod:
      children: {webservers: {}, dbservers: {}}
  hosts:
    lonely: {}
"""

PATTERNS = [
    "webservers", "prod", "prod:!dbservers", "prod:&db*", "web*", "!web1", "&webservers", "webservers[0]",
    "webservers[1:2]", "webservers[-1]", "webservers[1:]", "~web[12]", "~d", "db1,web2", "nothing", "web1:nothing",
    "prod[3]", "ungrouped", "webservers:dbservers:!web2", "all:!prod",
]


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inv") / "hosts.yaml"
    path.write_text(INVENTORY)
    return path


def ansible_limit(inventory: Path, limit: str) -> list[str]:
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    manager = InventoryManager(loader=DataLoader(), sources=[str(inventory)])
    manager.subset(limit)
    return [host.name for host in manager.get_hosts("all")]


def mesh_limit(inventory: Path, limit: str) -> list[str]:
    data = load_inventory(str(inventory))
    names, _ = limit_hosts(limit, list(data.hosts), inventory_vars(data).groups)
    return names


@pytest.mark.parametrize("limit", PATTERNS)
def test_limit_selects_what_ansible_selects(inventory: Path, limit: str) -> None:
    assert sorted(mesh_limit(inventory, limit)) == sorted(ansible_limit(inventory, limit))


def test_a_retry_file_is_read_as_ansible_reads_it(inventory: Path, tmp_path: Path) -> None:
    retry = tmp_path / "deploy.retry"
    retry.write_text("web2\n\n  db1  \n")
    for limit in (f"@{retry}", f"@{retry}:!db1", f"@{retry},web3", f"@{retry},db*"):
        assert sorted(mesh_limit(inventory, limit)) == sorted(ansible_limit(inventory, limit)), limit


def test_a_missing_limit_file_is_a_usage_error(inventory: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unable to find the limit file"):
        mesh_limit(inventory, f"@{tmp_path / 'nope.retry'}")
    with pytest.raises(UsageError, match="must be the path of a file"):
        mesh_limit(inventory, f"@{tmp_path}")


def test_terms_that_match_nothing_are_named(inventory: Path) -> None:
    data = load_inventory(str(inventory))
    names, unknown = limit_hosts("webservers:nothing:!gone", list(data.hosts), inventory_vars(data).groups)
    assert names == ["web1", "web2", "web3"] and unknown == ["nothing", "gone"]


def test_an_empty_retry_file_limits_to_no_host_where_ansible_takes_every_host(inventory: Path,
                                                                             tmp_path: Path) -> None:
    retry = tmp_path / "deploy.retry"
    retry.write_text("\n")
    assert mesh_limit(inventory, f"@{retry}") == []  # "only what is left to retry": nothing
    assert len(ansible_limit(inventory, f"@{retry}")) == 6  # a deliberate difference
