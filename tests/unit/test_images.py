"""The lab's artifact cache with fake builders: keys follow the recipe, a half-built or crashed build is
rebuilt, never trusted; plus the Debian plumbing (mirror, dependency closure, rootfs clean-up) on fake trees.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import MeshError
from mesh.lab import debian, images
from mesh.lab.images import MARKER, Recipe, ensure_artifact


class FakeBuilder:
    """Writes one file into the staging dir and counts its calls; optionally fails."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, recipe: Recipe, staging: Path, progress: Any) -> None:
        self.calls += 1
        assert not any(staging.iterdir()), "a build must start in an empty dir"
        (staging / "rootfs").mkdir()
        (staging / "rootfs" / "made-by").write_text(recipe.key)
        if self.fail:
            raise RuntimeError("build broke")


RECIPE = Recipe("thing", "bookworm", ("a", "b"), 1, min_free_bytes=0)


def quiet(message: str) -> None:
    pass


def test_key_follows_the_recipe() -> None:
    keys = {
        RECIPE.key,
        Recipe("thing", "bookworm", ("a", "b", "c"), 1).key,
        Recipe("thing", "trixie", ("a", "b"), 1).key,
        Recipe("thing", "bookworm", ("a", "b"), 2).key,
        Recipe("thing", "bookworm", ("a", "b"), 1, inputs=(("demoapp.py", "x"),)).key,
    }
    assert len(keys) == 5
    assert Recipe("thing", "bookworm", ("b", "a"), 1, min_free_bytes=5).key == RECIPE.key


def test_builds_once_then_reuses(tmp_path: Path) -> None:
    builder = FakeBuilder()
    first = ensure_artifact(RECIPE, builder, tmp_path, quiet)
    second = ensure_artifact(RECIPE, builder, tmp_path, quiet)
    assert first == second == tmp_path / f"thing-{RECIPE.key}"
    assert builder.calls == 1
    assert (first / MARKER).is_file()
    assert not list(tmp_path.glob(".build-*"))


def test_a_changed_recipe_builds_a_new_artifact(tmp_path: Path) -> None:
    builder = FakeBuilder()
    old = ensure_artifact(RECIPE, builder, tmp_path, quiet)
    new = ensure_artifact(Recipe("thing", "bookworm", ("a", "b", "c"), 1, min_free_bytes=0), builder, tmp_path, quiet)
    assert new != old and builder.calls == 2
    assert (old / MARKER).is_file()  # a lab may still run on the old one


def test_a_dir_without_marker_is_rebuilt(tmp_path: Path) -> None:
    half = tmp_path / f"thing-{RECIPE.key}"
    (half / "rootfs").mkdir(parents=True)
    (half / "rootfs" / "stale").write_text("half")
    builder = FakeBuilder()
    result = ensure_artifact(RECIPE, builder, tmp_path, quiet)
    assert builder.calls == 1
    assert not (result / "rootfs" / "stale").exists()
    assert (result / "rootfs" / "made-by").read_text() == RECIPE.key


def test_a_crashed_builds_leftovers_are_removed(tmp_path: Path) -> None:
    for name in (f".build-thing-{RECIPE.key}", ".build-thing-0000000000000000"):
        (tmp_path / name / "rootfs").mkdir(parents=True)
    builder = FakeBuilder()
    ensure_artifact(RECIPE, builder, tmp_path, quiet)
    assert builder.calls == 1
    assert not list(tmp_path.glob(".build-*"))


def test_a_failed_build_leaves_nothing_that_looks_built(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        ensure_artifact(RECIPE, FakeBuilder(fail=True), tmp_path, quiet)
    assert not (tmp_path / f"thing-{RECIPE.key}").exists()
    assert not list(tmp_path.glob(".build-*"))
    builder = FakeBuilder()
    ensure_artifact(RECIPE, builder, tmp_path, quiet)
    assert builder.calls == 1


def test_full_disk_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))  # type: ignore[attr-defined]
    builder = FakeBuilder()
    with pytest.raises(MeshError, match="not enough free disk space"):
        ensure_artifact(Recipe("big", "bookworm", (), 1, min_free_bytes=images.GIB), builder, tmp_path, quiet)
    assert builder.calls == 0


def test_cache_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(images.CACHE_ENV, str(tmp_path / "env-cache"))
    assert images.resolve_cache_dir() == tmp_path / "env-cache"
    assert images.resolve_cache_dir(tmp_path / "param") == tmp_path / "param"
    monkeypatch.delenv(images.CACHE_ENV)
    assert images.resolve_cache_dir() == Path("/var/cache/mesh-lab")


def test_public_functions_take_a_builder(tmp_path: Path) -> None:
    rootfs = images.ensure_node_rootfs(tmp_path, quiet, builder=FakeBuilder())
    assert rootfs.name == "rootfs" and rootfs.parent.name.startswith("node-rootfs-")
    assert images.ensure_app_image_tar(tmp_path, quiet, builder=FakeBuilder()).name == "app.tar"
    assert images.ensure_consul_binary(tmp_path, quiet, builder=FakeBuilder()).name == "consul"


def test_app_image_key_follows_the_demo_app() -> None:
    recipe = images.app_image_recipe(images.node_rootfs_recipe())
    digest = hashlib.sha256(images.demoapp_source().read_bytes()).hexdigest()
    assert ("demoapp.py", digest) in recipe.inputs
    assert ("base", images.node_rootfs_recipe().key) in recipe.inputs
    assert images.app_image_key() == recipe.key


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MeshError, match="apt-get install -y debootstrap"):
        images.require_tool("debootstrap", "debootstrap")


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images.os, "geteuid", lambda: 1000)
    with pytest.raises(MeshError, match="needs root"):
        images.require_root("building the lab's node rootfs")


def test_rootfs_is_cleaned_of_per_node_state(tmp_path: Path) -> None:
    root = tmp_path
    for name in ("etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub", "etc/ssh/sshd_config",
                 "etc/machine-id", "etc/hostname", "var/lib/dbus/machine-id", "etc/resolv.conf"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("build machine's\n")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    for unit in ("docker.service", "containerd.service", "ssh.service"):
        (wants / unit).symlink_to(f"/lib/systemd/system/{unit}")
    images.strip_per_node_state(root)
    images.disable_units(root, images.NODE_DISABLED_UNITS)
    assert sorted(p.name for p in (root / "etc/ssh").iterdir()) == ["sshd_config"]
    assert (root / "etc/machine-id").read_text() == ""
    assert not (root / "etc/hostname").exists() and not (root / "var/lib/dbus/machine-id").exists()
    assert sorted(p.name for p in wants.iterdir()) == ["ssh.service"]


def test_mirror_from_deb822_skips_security(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(debian.MIRROR_ENV, raising=False)
    sources = tmp_path / "debian.sources"
    sources.write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    assert debian.debian_mirror(sources, tmp_path / "none") == "http://mirror.example/debian"


def test_mirror_from_one_line_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(debian.MIRROR_ENV, raising=False)
    listing = tmp_path / "sources.list"
    listing.write_text("# deb http://old.example/ x main\ndeb [arch=amd64] http://m.example/debian bookworm main\n")
    assert debian.debian_mirror(tmp_path / "none", listing) == "http://m.example/debian"
    monkeypatch.setenv(debian.MIRROR_ENV, "http://override.example/debian")
    assert debian.debian_mirror(tmp_path / "none", listing) == "http://override.example/debian"


def test_no_mirror_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(debian.MIRROR_ENV, raising=False)
    with pytest.raises(MeshError, match="no Debian mirror"):
        debian.debian_mirror(tmp_path / "a", tmp_path / "b")


def test_dependency_closure(tmp_path: Path) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    stanzas = [
        "Package: app\nStatus: install ok installed\nDepends: libx (>= 1), mail-agent | exim\nPre-Depends: libc6",
        "Package: libx\nStatus: install ok installed\nDepends: libc6:any",
        "Package: postfix\nStatus: install ok installed\nProvides: mail-agent",
        "Package: libc6\nStatus: install ok installed",
        "Package: unrelated\nStatus: install ok installed",
    ]
    status.write_text("\n\n".join(stanzas) + "\n")
    assert debian.dependency_closure(tmp_path, ["app"]) == ["app", "libc6", "libx", "postfix"]


def test_a_downloaded_deb_is_checked_against_the_repositorys_checksum(tmp_path: Path) -> None:
    deb = tmp_path / "consul_1.8.7_amd64.deb"
    deb.write_bytes(b"package")
    assert debian.verify_deb(deb, hashlib.sha256(b"package").hexdigest()) == deb
    deb.write_bytes(b"tampered")
    with pytest.raises(MeshError, match="does not match the checksum"):
        debian.verify_deb(deb, hashlib.sha256(b"package").hexdigest())


def test_consul_is_pinned_per_architecture() -> None:
    version, digest = images.consul_deb("x86_64")
    assert version.startswith("1.8.7") and len(digest) == 64
    with pytest.raises(MeshError, match="pinned for x86_64 only"):
        images.consul_deb("sparc64")

