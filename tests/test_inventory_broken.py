"""The broken corpus: every inventory in tests/inventories/broken has one mistake, and mesh says where it is.

Each case's expect.yaml says how mesh must treat it:
  refused: true        every command refuses (exit 4): Ansible cannot read it, or reads only part of it
  refused: false       Ansible reads it, but almost surely not as meant: `list` prints what Ansible prints
                       and warns, `check` refuses
  refused: check-only  valid Ansible, invalid mesh variables: `list` prints without judging, `check` refuses
  file, line, key      where the mistake is (line may be absent when it has none, or a list of lines that are
                       equally right, e.g. a key's and its value's); `text` must appear on the same line too
  ansible: skip        do not ask Ansible (a hostile file it would choke on)
A case with generate.py is written into a temporary folder first (`python generate.py DIR`).
Every mesh run is a subprocess with a 10 s timeout and a 1 GiB address-space cap.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from inventory_reference import BROKEN, Run, Sandbox, cases, compare_list, inventory_path

BROKEN_CASES = cases(BROKEN)
MODES = {True, False, "check-only"}


@dataclass
class Case:
    name: str
    expect: dict[str, Any]
    path: Path  # what -i gets
    runs: dict[str, Run] = field(default_factory=dict)

    @property
    def mode(self) -> Any:
        return self.expect["refused"]


def _materialize(case: Path, workdir: Path) -> Path:
    """The case folder itself, or for a generated case a copy with the generated files in it."""
    if not (case / "generate.py").exists():
        return case
    target = workdir / case.name
    shutil.copytree(case, target)
    subprocess.run([sys.executable, str(target / "generate.py"), str(target)], check=True, timeout=120)
    return target


@pytest.fixture(scope="module")
def broken() -> Iterator[dict[str, Case]]:
    box = Sandbox()
    workdir = Path(tempfile.mkdtemp(prefix="mesh-broken-"))
    try:
        found: dict[str, Case] = {}
        for folder in BROKEN_CASES:
            expect = yaml.safe_load((folder / "expect.yaml").read_text())
            found[folder.name] = Case(folder.name, expect, inventory_path(_materialize(folder, workdir)))
        jobs: list[tuple[Any, ...]] = []
        keys: list[tuple[str, str]] = []
        for case in found.values():
            commands = ("list", "check", "host") if case.expect["refused"] is True else ("list", "check")
            for command in commands:
                argv = ["inventory", command, str(case.path)] + (["web1"] if command == "host" else [])
                jobs.append((box.mesh_run, *argv))
                keys.append((case.name, command))
            if case.expect.get("ansible") != "skip":
                jobs.append((box.ansible_list, case.path))
                keys.append((case.name, "ansible"))
        for (name, command), run in zip(keys, box.parallel(jobs)):
            found[name].runs[command] = run
        yield found
    finally:
        box.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _located_line(stderr: str, expect: dict[str, Any], prefix: str) -> str | None:
    """The first stderr line starting with prefix that names file[:line] and the key (and text)."""
    where = re.escape(expect["file"])
    lines = expect.get("line")
    if lines is not None:
        choices = lines if isinstance(lines, list) else [lines]
        where += ":(?:" + "|".join(str(int(n)) for n in choices) + r")\b"
    pattern = re.compile(rf"(?:^|[/\s]){where}")
    for line in stderr.splitlines():
        if not line.startswith(prefix) or not pattern.search(line):
            continue
        if "key" in expect and str(expect["key"]) not in line:
            continue
        if "text" in expect and str(expect["text"]).lower() not in line.lower():
            continue
        return line
    return None


def _assert_located(run: Run, expect: dict[str, Any], prefix: str) -> None:
    wanted = f"{expect['file']}:{expect.get('line', '*')} key={expect.get('key')!r} text={expect.get('text')!r}"
    assert _located_line(run.stderr, expect, prefix) is not None, (
        f"expected a line starting {prefix!r} naming {wanted}\n{run.describe()}"
    )


def _assert_clean(run: Run) -> None:
    assert not run.timed_out, f"mesh did not finish within 10 s\n{run.describe()}"
    assert "Traceback" not in run.stdout + run.stderr, run.describe()
    assert run.returncode != 250, f"unexpected error (a bug)\n{run.describe()}"


def test_corpus_size_and_expectations() -> None:
    assert len(BROKEN_CASES) >= 30
    for case in BROKEN_CASES:
        expect = yaml.safe_load((case / "expect.yaml").read_text())
        assert expect.get("refused") in MODES, case.name
        assert "file" in expect and ("key" in expect or "text" in expect), case.name


def _asks_ansible(case: Path) -> bool:
    return (yaml.safe_load((case / "expect.yaml").read_text()) or {}).get("ansible") != "skip"


@pytest.mark.parametrize("name", [c.name for c in BROKEN_CASES if _asks_ansible(c)])
def test_expectation_agrees_with_ansible(broken: dict[str, Case], name: str) -> None:
    """Where Ansible cannot read a case, mesh must refuse it in every command; where mesh only warns or
    judges mesh variables, Ansible must read the file."""
    case = broken[name]
    reference = case.runs["ansible"]
    if reference.returncode != 0:
        assert case.mode is True, f"Ansible refuses {name}, so mesh must refuse it\n{reference.describe()}"
    elif case.mode is not True:
        assert reference.returncode == 0, reference.describe()


@pytest.mark.parametrize("name", [c.name for c in BROKEN_CASES])
def test_list(broken: dict[str, Case], name: str) -> None:
    case = broken[name]
    run = case.runs["list"]
    _assert_clean(run)
    if case.mode is True:
        assert run.returncode == 4, run.describe()
        _assert_located(run, case.expect, "ERROR:")
        return
    assert run.returncode == 0, run.describe()
    if case.mode is False:
        _assert_located(run, case.expect, "[WARNING]:")
    else:  # check-only: list does not judge mesh variables
        key = str(case.expect.get("key", ""))
        judged = [ln for ln in run.stderr.splitlines() if ln.startswith("[WARNING]:") and key in ln]
        assert not judged, f"`list` must not judge mesh variables\n{run.describe()}"
    reference = case.runs.get("ansible")
    if reference is not None:
        diff = compare_list(reference, run)
        assert not diff, "mesh inventory list differs from ansible-inventory --list:\n" + "\n".join(diff)


@pytest.mark.parametrize("name", [c.name for c in BROKEN_CASES])
def test_check_refuses(broken: dict[str, Case], name: str) -> None:
    case = broken[name]
    run = case.runs["check"]
    _assert_clean(run)
    assert run.returncode == 4, run.describe()
    _assert_located(run, case.expect, "ERROR:")


@pytest.mark.parametrize("name", [c.name for c in BROKEN_CASES if
                                  yaml.safe_load((c / "expect.yaml").read_text())["refused"] is True])
def test_host_refuses(broken: dict[str, Case], name: str) -> None:
    run = broken[name].runs["host"]
    _assert_clean(run)
    assert run.returncode == 4, run.describe()
