"""The end-to-end tests' one lab for the whole session, brought up after a snapshot of the machine.
A lab that cannot start fails the tests (never a skip); the lab is taken down at the end in any case.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab_helpers import LAB_ARGS, LabUp, inventory_hosts, machine_state, mesh


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabUp]:
    if os.geteuid() != 0:
        pytest.fail("the lab end-to-end tests run as root (network namespaces, mounts, nspawn)")
    cleared = mesh("lab", "down")  # a lab an earlier run left is not part of the machine's own state
    if cleared.returncode != 0:
        pytest.fail(f"`mesh lab down` before the tests failed:\n{cleared.stderr}")
    before = machine_state()
    inventory = tmp_path_factory.mktemp("lab") / "lab.yaml"
    result = mesh("lab", "up", *LAB_ARGS, "--inventory", str(inventory), timeout=900)
    if result.returncode != 0:
        mesh("lab", "down")
        pytest.fail(f"`mesh lab up` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    state_dir = Path(os.environ.get("MESH_LAB_STATE") or "/var/lib/mesh-lab")
    yield LabUp(inventory, state_dir, inventory_hosts(inventory), before, result.stdout)
    mesh("lab", "down")  # idempotent: the last test already took it down when all went well


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The lab's own tests first: they need a lab nobody has deployed to, and their last test takes it down
    and compares the machine with its state before. The deploy tests then bring it up again as they need it.
    The sidecar tests last: they take the lab down and up undeployed, which would cost the module after them a
    first deploy of the whole lab. Within a module, the `xds` variants of tests parametrized by `delivery` come
    after the rest (delivery_helpers): the module deploys xds once, then the files inventory back."""
    last = {"test_lab.py": 0, "test_sidecar_lab.py": 2}
    module_at: dict[Path, int] = {}
    for index, item in enumerate(items):
        module_at.setdefault(item.path, index)

    def on_xds(item: pytest.Item) -> bool:
        callspec = getattr(item, "callspec", None)
        return callspec is not None and callspec.params.get("delivery") == "xds"

    items.sort(key=lambda item: (last.get(item.path.name, 1), module_at[item.path], on_xds(item)))
