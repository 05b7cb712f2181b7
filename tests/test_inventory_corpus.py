"""The good corpus: for every inventory in tests/inventories/good, `mesh inventory list` and `host` print the
same data as `ansible-inventory --list` and `--host` (types and host order included).

The reference runs once per session, four at a time; nothing is cached on disk between sessions. The
reference for `host` is `ansible-inventory --host` for one host per case and, for a second host, the same
data from `--list` (`_meta.hostvars`), which Ansible computes with the same code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from inventory_reference import (
    GOOD,
    WORKERS,
    Run,
    Sandbox,
    cases,
    compare_host,
    compare_list,
    hosts_of,
    inventory_path,
)

GOOD_CASES = cases(GOOD)
REPO = GOOD.parents[2]
# Inventories that follow INVENTORY.md and must pass `mesh inventory check` as they are.
MESH_VALID = [
    GOOD / "21-mesh-example-yaml" / "hosts.yaml",
    GOOD / "22-mesh-example-ini" / "hosts.ini",
    GOOD / "35-mesh-group-vars" / "hosts.yaml",
    GOOD / "37-mesh-metrics-yaml" / "hosts.yaml",
    GOOD / "38-mesh-metrics-ini" / "hosts.ini",
    GOOD / "43-mesh-delivery-yaml",
    GOOD / "44-mesh-delivery-ini" / "hosts.ini",
    REPO / "inventory" / "example.yaml",
    REPO / "inventory" / "example-ini" / "hosts.ini",
]


@dataclass
class CaseRuns:
    path: Path
    ansible_list: Run
    mesh_list: Run
    # host -> (the reference, mesh's answer); the reference is `ansible-inventory --host` for the last host
    # of a case and the `--list` output's `_meta.hostvars` entry for the first (the same data in Ansible).
    hosts: dict[str, tuple[Run, Run]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


def _from_list(listing: Run, host: str) -> Run:
    hostvars = listing.json().get("_meta", {}).get("hostvars", {}).get(host, {})
    return Run(("ansible-inventory", "--list", f"[_meta.hostvars.{host}]"), 0, json.dumps(hostvars), "")


@pytest.fixture(scope="module")
def corpus(sandbox: Sandbox) -> dict[str, CaseRuns]:
    """Every reference and mesh run of the corpus: Ansible four at a time in threads while mesh runs in
    this process (the corpus is trusted input; the broken corpus runs mesh in capped subprocesses)."""
    paths = {case.name: inventory_path(case) for case in GOOD_CASES}
    with ThreadPoolExecutor(WORKERS) as pool:
        lists = {name: pool.submit(sandbox.ansible_list, path) for name, path in paths.items()}
        mesh_lists = {name: sandbox.mesh_inprocess("inventory", "list", str(path)) for name, path in paths.items()}
        results = {name: CaseRuns(paths[name], lists[name].result(), mesh_lists[name]) for name in paths}
        pending = {}
        for name, case in results.items():
            if case.ansible_list.returncode != 0:
                continue
            hosts = hosts_of(case.ansible_list.json())
            if hosts:
                pending[name] = (hosts[-1], pool.submit(sandbox.ansible_host, case.path, hosts[-1]))
            if len(hosts) > 1:
                mesh = sandbox.mesh_inprocess("inventory", "host", str(case.path), hosts[0])
                case.hosts[hosts[0]] = (_from_list(case.ansible_list, hosts[0]), mesh)
        for name, (host, future) in pending.items():
            case = results[name]
            case.hosts[host] = (future.result(), sandbox.mesh_inprocess("inventory", "host", str(case.path), host))
    return results


def test_corpus_covers_both_formats() -> None:
    assert len(GOOD_CASES) >= 30
    suffixes = {inventory_path(c).suffix for c in GOOD_CASES}
    assert {".yaml", ".ini"} <= suffixes
    assert any(inventory_path(c).is_dir() for c in GOOD_CASES)


@pytest.mark.parametrize("case", [c.name for c in GOOD_CASES])
def test_ansible_accepts_case_cleanly(corpus: dict[str, CaseRuns], case: str) -> None:
    """A good case is one Ansible reads without a warning; otherwise the case itself is wrong."""
    run = corpus[case].ansible_list
    assert run.returncode == 0, run.describe()
    assert "WARNING" not in run.stderr and "ERROR" not in run.stderr, run.describe()


@pytest.mark.parametrize("case", [c.name for c in GOOD_CASES])
def test_list_equals_ansible_inventory(corpus: dict[str, CaseRuns], case: str) -> None:
    runs = corpus[case]
    if runs.ansible_list.returncode != 0:
        pytest.fail(f"ansible-inventory refused the case:\n{runs.ansible_list.describe()}")
    assert "Traceback" not in runs.mesh_list.stderr, runs.mesh_list.describe()
    diff = compare_list(runs.ansible_list, runs.mesh_list)
    assert not diff, f"{case}: mesh inventory list differs from ansible-inventory --list:\n" + "\n".join(diff)


@pytest.mark.parametrize("case", [c.name for c in GOOD_CASES])
def test_host_equals_ansible_inventory(corpus: dict[str, CaseRuns], case: str) -> None:
    runs = corpus[case]
    problems = []
    for host, (reference, mesh) in runs.hosts.items():
        assert "Traceback" not in mesh.stderr, mesh.describe()
        for line in compare_host(reference, mesh):
            problems.append(f"{host}: {line}")
    assert not problems, f"{case}: mesh inventory host differs from ansible-inventory --host:\n" + "\n".join(problems)


def test_unknown_host_exits_5_with_suggestion(sandbox: Sandbox) -> None:
    path = GOOD / "07-yaml-aliases" / "hosts.yaml"
    reference = sandbox.ansible_host(path, "jumpr")
    mesh = sandbox.mesh_run("inventory", "host", str(path), "jumpr")
    assert reference.returncode != 0
    assert mesh.returncode == 5, mesh.describe()
    assert "jumper" in mesh.stderr, mesh.describe()
    assert "Traceback" not in mesh.stderr


@pytest.mark.parametrize("path", MESH_VALID, ids=lambda p: str(p.relative_to(REPO)))
def test_mesh_examples_pass_check(sandbox: Sandbox, path: Path) -> None:
    run = sandbox.mesh_run("inventory", "check", str(path))
    assert run.returncode == 0, run.describe()
    assert run.stdout.strip(), "check prints a summary"
    assert "Traceback" not in run.stderr
