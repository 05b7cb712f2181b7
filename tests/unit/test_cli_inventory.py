"""Fleet commands take the inventory as INVENTORY, as -i PATH, or from $MESH_INVENTORY; exit 5 without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.cli import run
from mesh.errors import EXIT_PARSE_ERROR, EXIT_USAGE


@pytest.mark.parametrize("command", ["deploy", "status"])
def test_no_inventory_is_a_usage_error(command: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MESH_INVENTORY", raising=False)
    assert run([command]) == EXIT_USAGE
    assert "no inventory: give INVENTORY or -i PATH, or set MESH_INVENTORY" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["positional", "option", "environment"])
def test_every_way_of_naming_the_inventory_reaches_the_command(how: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.yaml")
    monkeypatch.delenv("MESH_INVENTORY", raising=False)
    argv = {"positional": ["status", missing], "option": ["status", "-i", missing], "environment": ["status"]}[how]
    if how == "environment":
        monkeypatch.setenv("MESH_INVENTORY", missing)
    assert run(argv) == EXIT_PARSE_ERROR
    assert f"{missing}: no such file or folder" in capsys.readouterr().err


def test_two_different_inventories_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["deploy", str(tmp_path / "a.yaml"), "-i", str(tmp_path / "b.yaml")]) == EXIT_USAGE
    assert "two inventories given" in capsys.readouterr().err
