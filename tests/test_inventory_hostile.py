"""The hostile corpus: inventories whose values would reach root-run files on the hosts (scripts, units, nft
rules, Envoy's config) or hang and exhaust mesh itself. Every one must be refused with exit 4 and a message
naming file, line and key: by `mesh inventory check`, and by deploy's planning before any host is reached.

Each case of tests/inventories/hostile is a folder with its inventory and expect.yaml (file, line, key, text:
the words of the message), or a folder with generate.py whose cases() gives many (every value x every payload).
Every case runs in a copy in a temporary folder, so a deploy that went too far would write nothing here.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh import cli
from mesh.deploy.command import DeployOptions, deploy
from mesh.errors import EXIT_PARSE_ERROR, MeshError
from mesh.testing.fake_connector import NoHostMayBeReached

HOSTILE = Path(__file__).resolve().parent / "inventories" / "hostile"
MESH = Path(sys.executable).parent / "mesh"
TIMEOUT = 60
CASE_FILES = {"expect.yaml", "generate.py", "README.md"}


@dataclass(frozen=True)
class Case:
    """One hostile inventory: its files (relative path -> text) and where mesh must point."""

    name: str
    files: dict[str, str]
    expect: dict[str, Any]

    def write(self, root: Path) -> Path:
        """Write the case under root; the path to give mesh (the `inventory/` folder or the one file)."""
        for relative, text in self.files.items():
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8", newline="")
        if (root / "inventory").is_dir():
            return root / "inventory"
        tops = [name for name in self.files if "/" not in name]
        assert len(tops) == 1, f"{self.name}: expected one inventory file, found {tops}"
        return root / tops[0]


def _folder_case(folder: Path) -> Case:
    files = {str(path.relative_to(folder)): path.read_text(encoding="utf-8")
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name not in CASE_FILES}
    return Case(folder.name, files, yaml.safe_load((folder / "expect.yaml").read_text()))


def _generated_cases(folder: Path) -> list[Case]:
    spec = importlib.util.spec_from_file_location(f"hostile_{folder.name.replace('-', '_')}", folder / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return [Case(f"{folder.name}/{name}", dict(case.files), dict(case.expect))
            for name, case in module.cases().items()]


def load_cases() -> list[Case]:
    found: list[Case] = []
    for folder in sorted(path for path in HOSTILE.iterdir() if path.is_dir()):
        found.extend(_generated_cases(folder) if (folder / "generate.py").exists() else [_folder_case(folder)])
    return found


CASES = load_cases()
BY_NAME = {case.name: case for case in CASES}
# A few through the real binary: the reported cases (hang, exit 250) and one of each kind.
BINARY_CASES = ["01-host-name-runs-in-sidecar-script", "12-health-path-crlf-header-injection",
                "16-unsafe-kept-literally", "17-template-power-hangs", "18-template-huge-string",
                "19-template-nested-loops", "21-proxyjump-garbage", "26-ini-range-host-vars-service-newline",
                "90-every-value-every-payload/ini-health_path-command-substitution"]


def located(text: str, expect: dict[str, Any]) -> str | None:
    """The first `ERROR:` line of text naming expect's file:line, key and words."""
    where = rf"(?:^|[/\s]){re.escape(str(expect['file']))}:{int(expect['line'])}\b"
    for line in text.splitlines():
        if not line.startswith("ERROR:") or not re.search(where, line):
            continue
        if str(expect["key"]) in line and str(expect["text"]).lower() in line.lower():
            return line
    return None


def _describe(case: Case, text: str) -> str:
    return f"{case.name}: expected an ERROR line naming {case.expect}\n--- got\n{text[-3000:]}"


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A folder for one case, left as the test found it otherwise (cwd too)."""
    before = os.getcwd()
    try:
        yield tmp_path
    finally:
        os.chdir(before)


def test_corpus_covers_the_review() -> None:
    assert len([case for case in CASES if "/" not in case.name]) >= 30
    assert len(CASES) >= 200
    for case in CASES:
        assert {"file", "line", "key", "text"} <= set(case.expect), case.name
    for name in BINARY_CASES:
        assert name in BY_NAME, name


@pytest.mark.parametrize("name", list(BY_NAME))
def test_check_refuses(name: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = BY_NAME[name]
    path = case.write(workdir)
    code = cli.run(["inventory", "check", str(path)])
    captured = capsys.readouterr()
    assert code == EXIT_PARSE_ERROR, _describe(case, captured.err)
    assert "Traceback" not in captured.err
    assert located(captured.err, case.expect), _describe(case, captured.err)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_deploy_refuses_before_any_host(name: str, workdir: Path) -> None:
    case = BY_NAME[name]
    path = case.write(workdir)
    factory = NoHostMayBeReached()
    out = io.StringIO()
    with pytest.raises(MeshError) as caught:
        deploy(str(path), DeployOptions(), output=out, connector_factory=factory)
    assert caught.value.exit_code == EXIT_PARSE_ERROR, f"{case.name}: {caught.value}"
    assert factory.calls == []
    text = "\n".join(f"ERROR: {line}" for line in str(caught.value).splitlines())
    assert located(text, case.expect), _describe(case, text)
    assert not any(workdir.rglob("*.key")), "no key may be made for a refused inventory"


def _run_mesh(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{MESH.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MESH_DEBUG", None)
    env.pop("MESH_INVENTORY", None)
    try:
        return subprocess.run([str(MESH), *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mesh {' '.join(args)} did not finish within {TIMEOUT} s")


@pytest.mark.parametrize("command", ["check", "deploy"])
@pytest.mark.parametrize("name", BINARY_CASES)
def test_real_binary_refuses_in_time(name: str, command: str, workdir: Path) -> None:
    case = BY_NAME[name]
    path = case.write(workdir)
    args = ["inventory", "check", str(path)] if command == "check" else ["deploy", str(path)]
    done = _run_mesh(args, workdir)
    report = f"$ mesh {' '.join(args)}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert done.returncode == EXIT_PARSE_ERROR, report
    assert "Traceback" not in done.stderr + done.stdout, report
    assert located(done.stderr, case.expect), report
    assert not (path.parent / ".mesh").exists(), "deploy made a state folder for a refused inventory"


# ---- what must still pass -----------------------------------------------------------------------------------

GOOD_FILES = {
    "hosts.ini": """[mesh_controllers]
ctl1 ansible_host=192.0.2.3

[web]
web[01:03] ansible_user=deploy

[containers]
dock[1:2]

[containers:vars]
mesh_host_kind=container_host
""",
    "group_vars/all.yml": """mesh_consul_url: "http://{{ consul_host }}:8500"
consul_host: 192.0.2.2
mesh_trust_domain: lab.mesh
mesh_cert_ttl: "{{ 12 * 2 }}h"
base_port: 8000
""",
    "group_vars/web.yml": """ansible_host: "192.0.2.{{ 10 + inventory_hostname[-1:] | int }}"
mesh_workloads:
  - service: web
    version: "v{{ groups['web'] | length }}"
    port: "{{ base_port + 80 }}"
    health: {http: "/healthz?full=1&x=%2F", interval: 5s}
    upstreams:
      - {service: api, local_port: "{{ 19100 + 1 }}"}
""",
    "group_vars/containers.yml": """ansible_host: "192.0.2.{{ 20 + inventory_hostname[-1:] | int }}"
labels: !unsafe "{{ kept as written }}"
mesh_workloads:
  - service: api
    port: 9090
    container: "api-{{ inventory_hostname }}"
    health: {http: "/{{ ['ready', 'z'] | join('') }}"}
""",
}


def test_benign_templated_inventory_still_passes(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for relative, text in GOOD_FILES.items():
        target = workdir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    code = cli.run(["inventory", "check", str(workdir / "hosts.ini")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "services: 2" in captured.out and "instances: 5" in captured.out, captured.out
    code = cli.run(["inventory", "list", str(workdir / "hosts.ini")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    listing = json.loads(captured.out)
    assert listing["_meta"]["hostvars"]["dock2"]["labels"] == {"__ansible_unsafe": "{{ kept as written }}"}


def test_generated_cases_can_be_written(tmp_path: Path) -> None:
    """`python generate.py DIR` writes the same cases the tests read (for looking at one by hand)."""
    folder = HOSTILE / "90-every-value-every-payload"
    subprocess.run([sys.executable, str(folder / "generate.py"), str(tmp_path)], check=True, timeout=60)
    written = {path.name for path in tmp_path.iterdir()}
    assert written == {case.name.split("/", 1)[1] for case in CASES if case.name.startswith(folder.name + "/")}
    shutil.rmtree(tmp_path)
