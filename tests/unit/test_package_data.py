"""Templates and playbooks ship in mesh's wheel: built from this checkout, installed into a folder of its own
(no editable install, no checkout on the path), run from outside the repository, they render and load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mesh.package_data import playbook_path, templates_dir

REPO = Path(__file__).resolve().parents[2]

_FROM_THE_WHEEL = textwrap.dedent("""
    import sys
    import mesh
    from mesh import package_data
    from mesh.deploy.playbook import load_playbook
    from mesh.deploy.modules import registry
    from mesh.deploy.steps import register_mesh_modules
    from mesh.render import render_firewall_unit, template_environment

    assert mesh.__file__.startswith(sys.argv[1]), mesh.__file__
    assert str(package_data.templates_dir()).startswith(sys.argv[1]), package_data.templates_dir()
    print("unit sections:", [line for line in render_firewall_unit().splitlines() if line.startswith("[")])
    print("envoy:", template_environment().get_template("envoy/bootstrap.yaml.j2").filename)
    modules = registry.copy()
    register_mesh_modules(modules)
    playbook = load_playbook(package_data.playbook_path("deploy.yml"), modules)
    print("plays:", len(playbook.plays))
    from mesh.controller.protocol import script_path, script_text
    assert str(script_path()).startswith(sys.argv[1]), script_path()
    print("mesh-ctl:", script_text().splitlines()[0])
    from mesh.dashboard.server import page_html
    print("dashboard:", page_html().splitlines()[0].decode())
""")


def test_the_checkout_finds_templates_and_the_deploy_playbook() -> None:
    assert (templates_dir() / "envoy").is_dir()
    assert playbook_path("deploy.yml").read_text() == (REPO / "playbooks" / "deploy.yml").read_text()


def test_an_unknown_playbook_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="no playbook 'nope.yml'"):
        playbook_path("nope.yml")


def test_a_built_wheel_carries_templates_and_playbooks(tmp_path: Path) -> None:
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", str(REPO), "-w", str(wheels)], check=True,
                   cwd=tmp_path, capture_output=True)
    (wheel,) = wheels.glob("mesh-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    assert not (target / "mesh" / "templates").is_symlink()
    # The wheel's mesh comes first on the path; its dependencies still come from this venv.
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", _FROM_THE_WHEEL, str(target)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "unit sections: ['[Unit]', '[Service]', '[Install]']"
    assert lines[1] == f"envoy: {target / 'mesh' / 'templates' / 'envoy' / 'bootstrap.yaml.j2'}"
    assert lines[2].startswith("plays: ") and int(lines[2].split()[1]) >= 1
    assert lines[3] == "mesh-ctl: #!/bin/sh"
    assert lines[4] == "dashboard: <!DOCTYPE html>"
