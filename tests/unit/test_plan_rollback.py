"""The health gate's rollback (mesh.deploy.steps.rollback): a proxy's running files kept before new ones are
moved into place, and put back, run by a real `sh` in a temp folder standing for the host's /."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mesh.config import paths
from mesh.deploy.steps.rollback import backup_command, backup_path, restore_command
from mesh.inventory.model import Connection, ManagedHost, Mesh, MeshSettings, Workload
from mesh.plan.build import PlanInputs, build_plan
from mesh.plan.model import ProxyPlan

TD = "test.mesh"


@pytest.fixture(scope="module")
def web() -> ProxyPlan:
    workload = Workload("vm1", 0, "web", 8080, TD)
    mesh = Mesh(MeshSettings(trust_domain=TD), (ManagedHost("vm1", "vm", Connection("10.0.0.11"), (workload,)),),
                services={"web": (workload,)})
    return build_plan(mesh, PlanInputs(b"root", "00")).host("vm1").proxy("web-8080")


def sh(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30, check=False)


def lay_out(root: Path, files: dict[str, str]) -> Path:
    folder = root / paths.proxy_dir("web-8080").lstrip("/")
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "tls").mkdir(exist_ok=True)
    (folder / "tls" / "key.pem").write_text("the key")
    return folder


def contents(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): path.read_text() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_the_files_kept_before_a_change_are_put_back_and_new_resource_files_removed(tmp_path: Path,
                                                                                  web: ProxyPlan) -> None:
    running = {"envoy.yaml": "old bootstrap", "ca.pem": "old ca", "xds/cds.yaml": "old clusters",
               "xds/lds.yaml": "old listeners"}
    folder = lay_out(tmp_path, running)
    root = str(tmp_path)
    kept = sh(backup_command(web, root))
    assert kept.returncode == 0, kept.stderr
    backup = Path(root + backup_path("web-8080"))
    assert backup.is_file() and oct(backup.parent.stat().st_mode & 0o777) == "0o700"
    # the deploy moves new files into place: a changed bootstrap, trust bundle and cluster file, a new route file,
    # and a listener file gone
    lay_out(tmp_path, {"envoy.yaml": "new bootstrap", "ca.pem": "new ca", "xds/cds.yaml": "new clusters",
                       "xds/rds.new.yaml": "a new route"})
    (folder / "xds" / "lds.yaml").unlink()
    restored = sh(restore_command(web, root))
    assert restored.returncode == 0, restored.stderr
    assert contents(folder) == {**running, "tls/key.pem": "the key"}  # no staging left, the key untouched


def test_without_a_backup_the_restore_exits_3_and_changes_nothing(tmp_path: Path, web: ProxyPlan) -> None:
    folder = lay_out(tmp_path, {"envoy.yaml": "new bootstrap", "xds/cds.yaml": "new clusters"})
    before = contents(folder)
    assert sh(restore_command(web, str(tmp_path))).returncode == 3
    assert contents(folder) == before


def test_a_proxy_with_no_files_yet_leaves_no_backup_to_restore(tmp_path: Path, web: ProxyPlan) -> None:
    """A first deploy: nothing ran before, so an older backup must not be restored over the new files."""
    stale = Path(str(tmp_path) + backup_path("web-8080"))
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older run's backup")
    assert sh(backup_command(web, str(tmp_path))).returncode == 0
    assert not stale.exists()
    assert sh(restore_command(web, str(tmp_path))).returncode == 3


def test_on_a_host_the_commands_name_the_hosts_own_paths(web: ProxyPlan) -> None:
    assert backup_command(web).startswith("mkdir -p -m 0700 /var/lib/mesh/rollback && cd / && ")
    assert "tar -cf /var/lib/mesh/rollback/web-8080.tar.tmp" in backup_command(web)
    restore = restore_command(web)
    assert restore.startswith("[ -f /var/lib/mesh/rollback/web-8080.tar ] || exit 3; set -e")
    assert "tar -C /etc/mesh/proxies/web-8080/.rollback -xpf /var/lib/mesh/rollback/web-8080.tar" in restore


def test_a_backup_without_a_bootstrap_yet_keeps_the_other_files(tmp_path: Path, web: ProxyPlan) -> None:
    """A deploy that failed before its bootstrap moved: the next one still keeps what is there (the backup used
    to fail whenever the bootstrap, the last file it looks for, was missing)."""
    folder = lay_out(tmp_path, {"ca.pem": "old ca", "xds/cds.yaml": "old clusters"})
    kept = sh(backup_command(web, str(tmp_path)))
    assert kept.returncode == 0, kept.stderr
    lay_out(tmp_path, {"ca.pem": "new ca", "xds/cds.yaml": "new clusters", "envoy.yaml": "new bootstrap"})
    assert sh(restore_command(web, str(tmp_path))).returncode == 0
    assert contents(folder) == {"ca.pem": "old ca", "envoy.yaml": "new bootstrap", "tls/key.pem": "the key",
                                "xds/cds.yaml": "old clusters"}
