"""Runs `ansible-inventory` (the reference) and `mesh inventory` side by side and compares their output as data.

Shared by the corpus, broken-corpus and hypothesis tests; knows nothing of any one case.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GOOD = HERE / "inventories" / "good"
BROKEN = HERE / "inventories" / "broken"
# Files in a case folder that are not part of the inventory.
CASE_FILES = {"expect.yaml", "generate.py", "README.md"}
VARS_DIRS = {"group_vars", "host_vars"}
TIMEOUT = 10.0
MEMORY_CAP = 1 << 30  # bytes of address space for one mesh run
WORKERS = 4
_INPROCESS = threading.Lock()


@dataclass(frozen=True)
class Run:
    """One finished command: exit code, output, and whether it ran out of time."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    def json(self) -> Any:
        return json.loads(self.stdout)

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit {self.returncode}{' (timed out)' if self.timed_out else ''}\n"
            f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"
        )


def inventory_path(case: Path) -> Path:
    """The path to pass as -i: the case's `inventory/` folder, else its one inventory file."""
    folder = case / "inventory"
    if folder.is_dir():
        return folder
    files = [p for p in case.iterdir() if p.is_file() and p.name not in CASE_FILES and p.name not in VARS_DIRS]
    if len(files) != 1:
        raise AssertionError(f"{case}: expected one inventory file, found {[p.name for p in files]}")
    return files[0]


def cases(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _run(argv: Sequence[str], env: dict[str, str], cwd: str, timeout: float, cap: bool) -> Run:
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            preexec_fn=_limit_memory if cap else None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Run(tuple(argv), -9, out, err, timed_out=True)
    return Run(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


class Sandbox:
    """An empty working directory and an environment free of the user's Ansible and mesh settings."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mesh-invref-")
        self.cwd = os.path.join(self.dir, "empty")
        os.mkdir(self.cwd)
        config = os.path.join(self.dir, "ansible.cfg")
        Path(config).write_text("[defaults]\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MESH_"))}
        env.update(
            ANSIBLE_CONFIG=config,
            ANSIBLE_HOME=os.path.join(self.dir, "ansible-home"),
            ANSIBLE_LOCAL_TEMP=os.path.join(self.dir, "ansible-tmp"),
            ANSIBLE_INVENTORY_UNPARSED_FAILED="true",
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_DEPRECATION_WARNINGS="false",
            LC_ALL="C.UTF-8",
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.env = env
        bindir = os.path.dirname(sys.executable)
        self.ansible_inventory = shutil.which("ansible-inventory", path=bindir) or shutil.which("ansible-inventory")
        self.mesh = shutil.which("mesh", path=bindir) or shutil.which("mesh")

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def ansible(self, path: Path | str, *args: str, timeout: float = 120.0) -> Run:
        assert self.ansible_inventory, "ansible-inventory is not installed (pip install -e '.[test]')"
        return _run([self.ansible_inventory, "-i", str(path), *args], self.env, self.cwd, timeout, cap=False)

    def ansible_list(self, path: Path | str) -> Run:
        return self.ansible(path, "--list")

    def ansible_host(self, path: Path | str, name: str) -> Run:
        return self.ansible(path, "--host", name)

    def mesh_run(self, *args: str, timeout: float = TIMEOUT, cap: bool = True) -> Run:
        assert self.mesh, "the mesh command is not installed (pip install -e .)"
        return _run([self.mesh, *args], self.env, self.cwd, timeout, cap=cap)

    def mesh_inprocess(self, *args: str) -> Run:
        """`mesh ARGS` through mesh.cli.run in this process (no interpreter start): for trusted inputs only,
        one at a time (stdout and stderr are swapped for the call)."""
        from mesh.cli import run

        out, err = io.StringIO(), io.StringIO()
        with _INPROCESS, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = run(list(args))
            except SystemExit as exc:  # run() should return, but a stray exit must not end the test session
                code = exc.code if isinstance(exc.code, int) else 1
        return Run(("mesh", *args), code, out.getvalue(), err.getvalue())

    def parallel(self, jobs: Iterable[tuple[Any, ...]]) -> list[Run]:
        """Runs (method, *args) jobs on a pool of WORKERS threads; results in job order."""
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = [pool.submit(job[0], *job[1:]) for job in jobs]
            return [f.result() for f in futures]


# Comparison ---------------------------------------------------------------------------------------


def typed(value: Any) -> Any:
    """A form of JSON data in which 1, 1.0, True and "1" all differ (Python's == says 1 == 1.0 == True)."""
    if isinstance(value, dict):
        return {"dict": {k: typed(v) for k, v in value.items()}}
    if isinstance(value, list):
        return {"list": [typed(v) for v in value]}
    return (type(value).__name__, value)


def normalize_list(data: Any) -> Any:
    """The output of `--list` with what may differ dropped: `_meta.profile` (Ansible's encoder name)."""
    data = json.loads(json.dumps(data))
    meta = data.get("_meta") if isinstance(data, dict) else None
    if isinstance(meta, dict):
        meta.pop("profile", None)
        if meta.get("hostvars") == {}:
            meta.pop("hostvars")
        if not meta:
            data.pop("_meta")
    return data


def differences(expected: Any, actual: Any, path: str = "", limit: int = 25) -> list[str]:
    """Human-readable differences of two JSON values, types included; lists compare in order.

    Host and children lists keep their order: Ansible keeps insertion order, and playbooks run hosts in it.
    """
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in a.keys() - b.keys():
                out.append(f"{where}/{key}: only in ansible-inventory: {json.dumps(a[key])[:200]}")
            for key in b.keys() - a.keys():
                out.append(f"{where}/{key}: only in mesh: {json.dumps(b[key])[:200]}")
            for key in a.keys() & b.keys():
                walk(a[key], b[key], f"{where}/{key}")
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b) or any(typed(x) != typed(y) for x, y in zip(a, b)):
                if len(a) == len(b) and all(isinstance(x, (dict, list)) for x in a):
                    for i, (x, y) in enumerate(zip(a, b)):
                        walk(x, y, f"{where}[{i}]")
                else:
                    out.append(f"{where}: ansible-inventory {json.dumps(a)[:300]} != mesh {json.dumps(b)[:300]}")
        elif typed(a) != typed(b):
            out.append(f"{where}: ansible-inventory {json.dumps(a)} ({type(a).__name__}) != "
                       f"mesh {json.dumps(b)} ({type(b).__name__})")

    walk(expected, actual, path)
    return out


def compare_list(reference: Run, mesh: Run) -> list[str]:
    """Differences between `ansible-inventory --list` and `mesh inventory list`, empty when equal as data."""
    if mesh.returncode != 0:
        return [f"mesh exited {mesh.returncode}:\n{mesh.stderr[-2000:]}"]
    try:
        actual = mesh.json()
    except ValueError as exc:
        return [f"mesh printed no JSON ({exc}): {mesh.stdout[:500]!r}"]
    return differences(normalize_list(reference.json()), normalize_list(actual))


def compare_host(reference: Run, mesh: Run) -> list[str]:
    if mesh.returncode != reference.returncode:
        codes = f"exit codes differ: ansible-inventory {reference.returncode}, mesh {mesh.returncode}"
        return [f"{codes}\n{mesh.stderr[-2000:]}"]
    if reference.returncode != 0:
        return []
    try:
        actual = mesh.json()
    except ValueError as exc:
        return [f"mesh printed no JSON ({exc}): {mesh.stdout[:500]!r}"]
    return differences(reference.json(), actual)


def hosts_of(listing: dict[str, Any]) -> list[str]:
    """Every host name of a `--list` output, in first-seen order."""
    seen: dict[str, None] = {}
    for name, group in listing.items():
        if name != "_meta" and isinstance(group, dict):
            for host in group.get("hosts", []):
                seen.setdefault(host, None)
    return list(seen)
