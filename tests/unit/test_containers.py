"""Container hosts: sidecar specs and `docker run` arguments, reachability scripts and the watcher (goldens in
tests/golden/containers/), the sidecar image tarball, and the runner modules on a fake host.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.config import compute_proxy_config, paths
from mesh.config.validate import throwaway_tls_files
from mesh.containers import image as image_mod
from mesh.containers.docker import published_ports
from mesh.containers.image import ImageFile, build_sidecar_image_tar, shared_libraries, write_image_tar
from mesh.containers.modules import (
    STAGING_DIR,
    file_modes,
    register_container_modules,
    sidecar,
    sidecar_host,
    sidecar_image,
)
from mesh.containers.reachability import (
    RULES_PATH,
    WATCHER_UNIT,
    AppGuard,
    SidecarEntry,
    UnsafeScript,
    app_guards,
    checked_script,
    render_rules,
    render_sidecar_list,
    render_watcher,
    render_watcher_unit,
    sidecar_entries,
)
from mesh.containers.sidecar import (
    NotAContainerWorkload,
    docker_run_args,
    files_hash,
    hashed_files,
    sidecar_spec,
    validate_args,
)
from mesh.deploy.errors import ModuleFailure
from mesh.deploy.execute import apply_change
from mesh.deploy.modules import registry
from mesh.deploy.modules.api import Change, ModuleRun, Outcome, PutFile, RunCommand, TaskContext
from mesh.hosts.connection import CommandResult
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import ManagedHost, Mesh
from mesh.inventory.validate import build_mesh
from mesh.plan.build import PlanInputs, build_plan
from mesh.plan.model import HostPlan, Plan, ProxyPlan
from mesh.render import render_proxy_files, validate_proxy_files
from mesh.testing.fake_connector import FakeConnector, FakeFile, FakeHost

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "containers"
INVENTORY = GOLDEN / "input" / "inventory.yaml"
IMAGE = "mesh-envoy:0123456789ab"


def golden_mesh() -> Mesh:
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY))


def dock1() -> ManagedHost:
    return golden_mesh().host("dock1")


def sources() -> tuple[str, ...]:
    """Who may reach the golden mesh's metrics ports (its controller)."""
    return golden_mesh().metrics_sources


def check_golden(path: Path, text: str, update: bool) -> None:
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run pytest --update-goldens"
    assert text == path.read_text(), f"{path} differs: run pytest --update-goldens and review the diff"


# ---- sidecar spec and docker arguments ------------------------------------------------------------------


def test_sidecar_run_and_validate_args_golden(update_goldens: bool) -> None:
    host = dock1()
    lines = []
    for workload in host.workloads:
        spec = sidecar_spec(host, workload, IMAGE, "f" * 16)
        lines += [f"# {spec.name}", shlex.join(["docker", *docker_run_args(spec)]),
                  shlex.join(["docker", *validate_args(spec)]), ""]
    check_golden(GOLDEN / "sidecar-docker-args.txt", "\n".join(lines), update_goldens)


def test_sidecar_joins_the_app_namespace_read_only_and_unprivileged() -> None:
    host = dock1()
    spec = sidecar_spec(host, host.workloads[0], IMAGE, "abc")
    args = docker_run_args(spec)
    pairs = set(itertools.pairwise(args))
    assert spec.name == "mesh-envoy-api-api-v2-1"
    assert ("--network", "container:api-v2-1") in pairs and ("--restart", "always") in pairs
    assert {("--cap-drop", "ALL"), ("--security-opt", "no-new-privileges"), ("--user", "64101:64101")} <= pairs
    assert "--read-only" in args and ("--memory", "256m") in pairs
    assert ("--volume", "/etc/mesh/proxies/api-api-v2-1:/etc/mesh/proxies/api-api-v2-1:ro") in pairs
    assert len([word for word in args if word == "--volume"]) == 2  # the folder (its own ca.pem in it) and admin/
    assert {("--label", "mesh.managed-by=mesh"), ("--label", "mesh.proxy=api-api-v2-1"),
            ("--label", f"mesh.config-hash={spec.revision}")} <= pairs
    assert "-p" not in args and "--publish" not in args  # Docker refuses it with --network container:
    assert args[args.index(IMAGE) + 1:] == ["-c", "/etc/mesh/proxies/api-api-v2-1/envoy.yaml",
                                            "--base-id", "21000",  # its proxy port: unique on the host
                                            "--disable-hot-restart", "--reject-unknown-dynamic-fields",
                                            "--log-level", "warn", "--file-flush-interval-msec", "1000"]
    assert spec.labels["mesh.config-hash"] == spec.revision


def test_revision_follows_files_image_and_arguments_only() -> None:
    host = dock1()
    workload = host.workloads[0]
    digests = {path: "0" * 64 for path in hashed_files("api-api-v2-1")}
    base = sidecar_spec(host, workload, IMAGE, files_hash(digests, IMAGE))
    assert base.revision == sidecar_spec(host, workload, IMAGE, files_hash(dict(digests), IMAGE)).revision
    changed_cert = {**digests, paths.cert_path("api-api-v2-1"): "1" * 64}
    assert sidecar_spec(host, workload, IMAGE, files_hash(changed_cert, IMAGE)).revision != base.revision
    other_image = "mesh-envoy:ba9876543210"
    assert sidecar_spec(host, workload, other_image, files_hash(digests, other_image)).revision != base.revision
    from dataclasses import replace
    assert replace(base, memory="512m").revision != base.revision


def test_sidecar_spec_refuses_a_vm_workload() -> None:
    vm1 = golden_mesh().host("vm1")
    with pytest.raises(NotAContainerWorkload):
        sidecar_spec(vm1, vm1.workloads[0], IMAGE, "abc")


def test_container_workload_config_is_valid_with_the_sidecar_paths() -> None:
    """compute_proxy_config needs no change for containers: same paths in the sidecar, app on 127.0.0.1."""
    mesh = golden_mesh()
    workload = mesh.host("dock1").workloads[0]
    cfg = compute_proxy_config(mesh, workload)
    assert cfg.inbound.address == "0.0.0.0" and cfg.inbound.port == 21000
    assert cfg.clusters[0].endpoints[0].address == "127.0.0.1"
    mounted = {mount.path for mount in sidecar_spec(mesh.host("dock1"), workload, IMAGE, "x").mounts}
    for path in (cfg.secrets.certificate.certificate_chain, cfg.secrets.certificate.private_key,
                 cfg.secrets.trust_bundle.trusted_ca, cfg.config_path):
        assert any(path == folder or path.startswith(folder + "/") for folder in mounted), path
    validate_proxy_files(render_proxy_files(cfg), throwaway_tls_files()["trusted_ca"])


# ---- reachability and the watcher ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "render"), [
    ("sidecar-rules.sh", lambda: render_rules(dock1(), sources())),
    ("sidecars.list", lambda: render_sidecar_list(dock1())),
    ("mesh-sidecars.sh", lambda: render_watcher(dock1())),
    (WATCHER_UNIT, render_watcher_unit),
])
def test_host_files_golden(name: str, render: Callable[[], str], update_goldens: bool) -> None:
    check_golden(GOLDEN / name, render(), update_goldens)


@pytest.mark.parametrize("render", [lambda: render_rules(dock1(), sources()), lambda: render_watcher(dock1())])
def test_scripts_are_posix_shell(render: Callable[[], str]) -> None:
    checked = subprocess.run(["sh", "-n"], input=render(), capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr


def test_rules_name_only_mesh_chains_and_every_proxy_port() -> None:
    text = render_rules(dock1(), sources())
    assert "ENTRIES='api-v2-1 21000 20000\napi-v2-2 21005 20001\n'" in text
    assert "iptables-restore -w --noflush" in text
    for line in text.splitlines():
        if "iptables -w" in line and (" -I " in line or " -A " in line or " -F " in line or " -X " in line):
            assert "$NAT_CHAIN" in line or "$FWD_CHAIN" in line or "-N DOCKER-USER" in line, line
    assert [(e.app_container, e.proxy_port) for e in sidecar_entries(dock1())] == [("api-v2-1", 21000),
                                                                                   ("api-v2-2", 21005)]


def test_rules_script_output_with_fake_docker_and_iptables(tmp_path: Path) -> None:
    """Run the rendered script's `desired` with docker answering an address for one app and not the other."""
    script = render_rules(dock1(), sources()).replace("PATH=/usr/local/sbin", f"PATH={tmp_path}:/usr/local/sbin")
    (tmp_path / "docker").write_text('#!/bin/sh\n[ "$5" = api-v2-1 ] && echo "172.18.0.5 " || exit 1\n')
    (tmp_path / "docker").chmod(0o755)
    body = script.split("\n# The watcher and a deploy")[0] + "\ndesired\n"  # no lock, no iptables
    done = subprocess.run(["sh", "-c", body], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "*nat", ":MESH-SIDECARS - [0:0]", "-A MESH-SIDECARS -i docker+ -j RETURN", "-A MESH-SIDECARS -i br-+ -j RETURN",
        "-A MESH-SIDECARS -p tcp -m tcp --dport 21000 -j DNAT --to-destination 172.18.0.5:21000",
        "-A MESH-SIDECARS -p tcp -m tcp --dport 20000 -j DNAT --to-destination 172.18.0.5:20000", "COMMIT",
        "*filter", ":MESH-SIDECARS-FWD - [0:0]",
        "-A MESH-SIDECARS-FWD -d 172.18.0.5/32 -p tcp -m tcp --dport 21000 -m conntrack --ctstate DNAT -j ACCEPT",
        ("-A MESH-SIDECARS-FWD -s 10.0.0.3/32 -d 172.18.0.5/32 -p tcp -m tcp --dport 20000 -m conntrack --ctstate "
         "DNAT -j ACCEPT"),
        "-A MESH-SIDECARS-FWD -d 172.18.0.5/32 -p tcp -m tcp --dport 20000 -j DROP",
        "COMMIT"]
    assert "api-v2-2 is not running" in done.stderr


# ---- the sidecar image -----------------------------------------------------------------------------------


def _tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


def test_image_tar_is_deterministic_and_sorted(tmp_path: Path) -> None:
    (tmp_path / "bin").write_bytes(b"\x7fELF fake")
    (tmp_path / "lib").write_bytes(b"lib")
    files = (ImageFile("/usr/local/bin/envoy", tmp_path / "bin", 0o755),
             ImageFile("/lib/x86_64-linux-gnu/libc.so.6", tmp_path / "lib", 0o755))
    first, second = io.BytesIO(), io.BytesIO()
    write_image_tar(first, files, image_mod.etc_files())
    (tmp_path / "lib").touch()  # a new mtime, same bytes
    write_image_tar(second, files, image_mod.etc_files())
    assert first.getvalue() == second.getvalue()
    names = _tar_names(first.getvalue())
    assert names == sorted(names)
    with tarfile.open(fileobj=io.BytesIO(first.getvalue()), mode="r:gz") as tar:
        assert {(m.uid, m.gid, m.mtime) for m in tar.getmembers()} == {(0, 0, 0)}
        assert tar.getmember("tmp").mode == 0o1777
    for name in ("a.tar.gz", "another-name.tar.gz"):  # gzip must not record the file's name
        with (tmp_path / name).open("wb") as handle:
            write_image_tar(handle, files, image_mod.etc_files())
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "another-name.tar.gz").read_bytes()
    (tmp_path / "lib").write_bytes(b"lib2")
    third = io.BytesIO()
    write_image_tar(third, files, image_mod.etc_files())
    assert third.getvalue() != first.getvalue()


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> image_mod.SidecarImage:
    return build_sidecar_image_tar(tmp_path_factory.mktemp("image-cache"))


def test_real_image_holds_envoy_every_ldd_library_and_the_user(built_image: image_mod.SidecarImage) -> None:
    names = set(_tar_names(built_image.path.read_bytes()))
    from mesh.config.validate import envoy_binary
    libraries = shared_libraries(Path(envoy_binary()))
    assert any("ld-linux" in library for library in libraries) and any("libc.so" in lib for lib in libraries)
    assert {library.lstrip("/") for library in libraries} <= names
    assert {"usr/local/bin/envoy", "etc/passwd", "etc/group", "tmp"} <= names
    with tarfile.open(built_image.path, mode="r:gz") as tar:
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None and b"envoy:x:64101:64101:" in passwd.read()
    assert built_image.tag.startswith("mesh-envoy:") and len(built_image.digest) == 12


def test_real_image_is_cached_by_content(built_image: image_mod.SidecarImage) -> None:
    mtime = built_image.path.stat().st_mtime_ns
    again = build_sidecar_image_tar(built_image.path.parent.parent)
    assert again == built_image and again.path.stat().st_mtime_ns == mtime


# ---- the runner modules on a fake host -------------------------------------------------------------------


class FakeDocker:
    """Answers the docker commands of the modules on a FakeHost: containers by name, images by tag."""

    def __init__(self, host: FakeHost, validate_ok: bool = True) -> None:
        self.host = host
        self.containers: dict[str, dict[str, Any]] = {}
        self.images: set[str] = set()
        self.validate_ok = validate_ok
        self.next_id = 0
        host.stub(r"^docker ", self.run)
        host.stub(r"^readlink /proc/", lambda cmd, _: CommandResult(0, f"net:[{cmd.split('/')[2]}]\n".encode(), b""))
        host.stub(r"^stat -c '%u:%g:%a'", self.stat)
        host.stub(r"^stat -c '%F\|%u:%g\|%a'", lambda cmd, _: folder_stat(host, cmd))
        host.stub(r"^sleep ", CommandResult(0, b"", b""))
        host.stub(r"systemd-analyze verify", CommandResult(0, b"", b""))  # the watcher's unit passes the check
        self.modes: dict[str, str] = {path: f"{uid}:{gid}:{mode:o}" for path, uid, gid, mode in file_modes("api-api-v2-1")}

    def add(self, name: str, pid: int, label: str | None = None, bindings: dict[str, Any] | None = None,
            publish_all: bool = False, ports: dict[str, Any] | None = None) -> None:
        """A container; bindings, publish_all and ports as `docker inspect` prints HostConfig.PortBindings,
        HostConfig.PublishAllPorts and NetworkSettings.Ports."""
        self.next_id += 1
        self.containers[name] = {"id": f"id{self.next_id}", "pid": pid, "label": label,
                                 "maps": [bindings or {}, publish_all, ports or {}]}

    def stat(self, cmd: str, _: bytes | None) -> CommandResult:
        path = shlex.split(cmd)[-1]
        return CommandResult(0, f"{self.modes.get(path, '0:0:644')}\n".encode(), b"")

    def run(self, cmd: str, _: bytes | None) -> CommandResult:
        words = shlex.split(cmd.split(" >/dev/null")[0].split(";")[0])
        if words[1:3] == ["container", "inspect"]:
            found = self.containers.get(words[-1])
            if found is None:
                return CommandResult(1, b"", f"Error: No such container: {words[-1]}".encode())
            line = f"{found['id']}|running|true|{found['pid']}|0|{found['label'] or '<no value>'}"
            line = "\t".join([line, *(json.dumps(value) for value in found["maps"])]) + "\n"
            return CommandResult(0, line.encode(), b"")
        if words[1:3] == ["image", "inspect"]:
            return CommandResult(0 if words[-1] in self.images else 1, b"", b"")
        if words[1] == "import":
            self.images.add(words[-1])
            return CommandResult(0, b"", b"")
        if words[1:3] == ["run", "--rm"]:
            return CommandResult(0 if self.validate_ok else 1, b"", b"[critical] bad config")
        if words[1:3] == ["run", "--detach"]:
            name = words[words.index("--name") + 1]
            label = next(w.split("=", 1)[1] for w in words if w.startswith("mesh.config-hash="))
            app = words[words.index("--network") + 1].removeprefix("container:")
            self.add(name, self.containers[app]["pid"], label)
            self.containers[name]["proxy"] = next(w.split("=", 1)[1] for w in words if w.startswith("mesh.proxy="))
            self.host.start_envoy(self.containers[name]["proxy"])  # its Envoy reads the bootstrap it finds
            return CommandResult(0, b"", b"")
        if words[1] == "rm":
            removed = self.containers.pop(words[-1], None)
            if removed is not None and removed.get("proxy"):
                self.host.running.pop(removed["proxy"], None)
            return CommandResult(0, b"", b"")
        if words[1] == "ps":  # mesh's containers: names, or as the observation's --format asks
            mesh = {name: found for name, found in self.containers.items() if found["label"] is not None}
            if "--format" in words and words[words.index("--format") + 1].startswith("S\t"):
                return CommandResult(0, "".join(f"S\t{name}\t{found['label']}\trunning\n"
                                                for name, found in mesh.items()).encode(), b"")
            return CommandResult(0, "".join(f"{name}\n" for name in mesh).encode(), b"")
        if words[1] == "restart":
            self.containers[words[-1]]["pid"] = self.containers[words[-1]].get("app_pid", 1)
            if self.containers[words[-1]].get("proxy"):
                self.host.start_envoy(self.containers[words[-1]]["proxy"])
            return CommandResult(0, b"", b"")
        return CommandResult(127, b"", f"fake docker: {cmd}".encode())


def folder_stat(host: FakeHost, cmd: str) -> CommandResult:
    """`stat -c '%F|%u:%g|%a' PATH` on the fake host's files (owners by number)."""
    found = host.files.get(shlex.split(cmd)[-1])
    if found is None:
        return CommandResult(1, b"", b"stat: cannot statx: No such file or directory")
    kind = "directory" if found.data is None else "regular file"
    owner = {"root": "0"}.get(found.owner, found.owner)
    group = {"root": "0"}.get(found.group, found.group)
    return CommandResult(0, f"{kind}|{owner}:{group}|{found.mode:o}\n".encode(), b"")


@dataclass(frozen=True)
class PlanEntries:
    """What the container modules read of the deploy's shared object (DeployContext.proxy): the plan's entries."""

    plan: Plan

    def proxy(self, host: str, name: str) -> ProxyPlan:
        return self.plan.host(host).proxy(name)

    def host_plan(self, host: str) -> HostPlan:
        return self.plan.host(host)


def planned(image: str = IMAGE) -> PlanEntries:
    """dock1's plan with the sidecar image `image` (what the deploy computes before it reaches the host)."""
    inputs = PlanInputs(b"the root certificate", "00:11", sidecar_image=image)
    return PlanEntries(build_plan(golden_mesh(), inputs, [dock1()]))


def drive(module: Callable[[TaskContext[Any], dict[str, Any]], ModuleRun], host: FakeHost,
          managed: ManagedHost, args: dict[str, Any], shared: PlanEntries | None = None) -> tuple[Outcome, list[Change]]:
    connector = FakeConnector(host)
    ctx: TaskContext[Any] = TaskContext(managed, connector, {}, False, shared or planned(args.get("image", IMAGE)),
                                        Path("."), Path("."))
    steps, changes = module(ctx, args), []
    try:
        change = next(steps)
        while True:
            changes.append(change)
            change = steps.send(apply_change(change, connector))
    except StopIteration as stop:
        return stop.value or Outcome(), changes


def proxy_files(host: FakeHost) -> None:
    for path in (*hashed_files("api-api-v2-1"), paths.key_path("api-api-v2-1")):
        host.write(path, f"content of {path}")


def test_sidecar_created_then_left_alone_then_replaced_when_its_plan_changes() -> None:
    host, managed = FakeHost("dock1"), dock1()
    docker = FakeDocker(host)
    docker.images.add(IMAGE)
    docker.add("api-v2-1", pid=500)
    proxy_files(host)
    outcome, changes = drive(sidecar, host, managed, {"proxy": "api-api-v2-1", "image": IMAGE})
    assert not outcome.failed, outcome.msg
    assert [c.description for c in changes] == ["validate /etc/mesh/proxies/api-api-v2-1/envoy.yaml",
                                                "run mesh-envoy-api-api-v2-1"]
    first_id = docker.containers["mesh-envoy-api-api-v2-1"]["id"]
    outcome, changes = drive(sidecar, host, managed, {"proxy": "api-api-v2-1", "image": IMAGE})
    assert changes == [] and outcome.data["id"] == first_id and "up to date" in outcome.msg
    spec = planned().proxy("dock1", "api-api-v2-1").sidecar
    assert spec is not None and docker.containers["mesh-envoy-api-api-v2-1"]["label"] == spec.revision
    # A new image (as a new bootstrap would) gives the plan another revision: the sidecar is replaced.
    other = "mesh-envoy:ba9876543210"
    docker.images.add(other)
    outcome, changes = drive(sidecar, host, managed, {"proxy": "api-api-v2-1", "image": other})
    assert [c.description for c in changes] == ["validate /etc/mesh/proxies/api-api-v2-1/envoy.yaml",
                                                "remove the old mesh-envoy-api-api-v2-1",
                                                "run mesh-envoy-api-api-v2-1"]
    assert docker.containers["mesh-envoy-api-api-v2-1"]["id"] != first_id


def test_sidecar_in_a_stale_namespace_is_restarted_not_recreated() -> None:
    host, managed = FakeHost("dock1"), dock1()
    docker = FakeDocker(host)
    docker.images.add(IMAGE)
    docker.add("api-v2-1", pid=500)
    proxy_files(host)
    drive(sidecar, host, managed, {"proxy": "api-api-v2-1", "image": IMAGE})
    docker.containers["api-v2-1"]["pid"] = 600  # the app restarted: a new namespace
    docker.containers["mesh-envoy-api-api-v2-1"]["app_pid"] = 600
    _outcome, changes = drive(sidecar, host, managed, {"proxy": "api-api-v2-1", "image": IMAGE})
    assert [c.description for c in changes] == [
        "restart mesh-envoy-api-api-v2-1 into the network namespace of api-v2-1"]


def test_sidecar_refused_config_keeps_the_running_sidecar() -> None:
    host, managed = FakeHost("dock1"), dock1()
    docker = FakeDocker(host)
    docker.images.add(IMAGE)
    docker.add("api-v2-1", pid=500)
    docker.add("mesh-envoy-api-api-v2-1", pid=500, label="old")
    proxy_files(host)
    docker.validate_ok = False
    outcome, changes = drive(sidecar, host, managed, {"proxy": "api-api-v2-1", "image": IMAGE})
    assert outcome.failed and "keeps running its previous config" in outcome.msg and "bad config" in outcome.msg
    assert all("docker rm" not in c.cmd and "--detach" not in c.cmd for c in changes if isinstance(c, RunCommand))
    assert docker.containers["mesh-envoy-api-api-v2-1"]["label"] == "old"


def test_sidecar_with_a_missing_app_container_fails_clearly_and_touches_nothing() -> None:
    host, managed = FakeHost("dock1"), dock1()
    docker = FakeDocker(host)
    docker.images.add(IMAGE)
    proxy_files(host)
    outcome, changes = drive(sidecar, host, managed, {"proxy": "api-api-v2-1", "image": IMAGE})
    assert outcome.failed and changes == []
    assert "'api-v2-1' does not exist on dock1" in outcome.msg and "never creates" in outcome.msg
    assert not any(cmd.startswith("docker run") for cmd in host.commands)


def test_sidecar_fixes_ownership_for_the_sidecar_user() -> None:
    host, managed = FakeHost("dock1"), dock1()
    docker = FakeDocker(host)
    docker.images.add(IMAGE)
    docker.add("api-v2-1", pid=500)
    proxy_files(host)
    docker.modes[paths.key_path("api-api-v2-1")] = "0:0:600"
    _, changes = drive(sidecar, host, managed, {"proxy": "api-api-v2-1", "image": IMAGE})
    assert isinstance(changes[0], RunCommand)
    key = paths.key_path("api-api-v2-1")
    assert changes[0].cmd == f"chown 64101:64101 {key} && chmod 0600 {key}"


def test_sidecar_image_sent_only_when_the_tag_is_missing(tmp_path: Path) -> None:
    host, managed = FakeHost("dock1"), dock1()
    docker = FakeDocker(host)
    tar = tmp_path / "image.tar.gz"
    tar.write_bytes(b"tarball")
    args = {"src": str(tar), "tag": IMAGE}
    outcome, changes = drive(sidecar_image, host, managed, args)
    assert outcome.data == {"tag": IMAGE, "sent": True} and IMAGE in docker.images
    assert [c.description for c in changes] == ["create /var/lib/mesh", "create /var/lib/mesh/images",
                                                f"send the sidecar image {IMAGE}", f"docker import {IMAGE}"]
    put, imported = changes[2], changes[3]
    assert isinstance(put, PutFile) and isinstance(imported, RunCommand)
    assert put.path == f"{STAGING_DIR}/mesh-envoy-0123456789ab.tar.gz" and put.mode == 0o600
    assert changes[1].cmd == "mkdir -m 0700 /var/lib/mesh/images && chown 0:0 /var/lib/mesh/images"  # type: ignore[union-attr]
    assert "--change 'USER 64101:64101'" in imported.cmd
    assert "'ENTRYPOINT [\"/usr/local/bin/envoy\"]'" in imported.cmd
    assert "rm -f /var/lib/mesh/images/mesh-envoy-0123456789ab.tar.gz" in imported.cmd
    assert not any("/var/tmp" in cmd for cmd in host.commands)
    outcome, changes = drive(sidecar_image, host, managed, args)
    assert changes == [] and outcome.data["sent"] is False


def test_sidecar_image_staging_folder_made_root_only_again(tmp_path: Path) -> None:
    host, managed = FakeHost("dock1"), dock1()
    FakeDocker(host)
    tar = tmp_path / "image.tar.gz"
    tar.write_bytes(b"tarball")
    host.files["/var/lib/mesh"] = FakeFile(None, 0o755)
    host.files[STAGING_DIR] = FakeFile(None, 0o777, "1000", "1000")
    _, changes = drive(sidecar_image, host, managed, {"src": str(tar), "tag": IMAGE})
    assert isinstance(changes[0], RunCommand)
    assert changes[0].cmd == f"chown 0:0 {STAGING_DIR} && chmod 0700 {STAGING_DIR}"
    assert [c.description for c in changes][1:] == [f"send the sidecar image {IMAGE}", f"docker import {IMAGE}"]


@pytest.mark.parametrize(("path", "file", "why"), [
    ("/var/lib/mesh", FakeFile(None, 0o777), "owned by 0:0 with mode 777"),
    ("/var/lib/mesh", FakeFile(None, 0o755, "1000"), "owned by 1000:0 with mode 755"),
    (STAGING_DIR, FakeFile(b"a file"), "is a regular file, not a folder"),
])
def test_sidecar_image_refuses_a_staging_folder_others_control(tmp_path: Path, path: str, file: FakeFile,
                                                               why: str) -> None:
    host, managed = FakeHost("dock1"), dock1()
    FakeDocker(host)
    tar = tmp_path / "image.tar.gz"
    tar.write_bytes(b"tarball")
    host.files["/var/lib/mesh"] = FakeFile(None, 0o755)
    host.files[path] = file
    with pytest.raises(ModuleFailure, match=why):
        drive(sidecar_image, host, managed, {"src": str(tar), "tag": IMAGE})
    assert not host.puts


def test_sidecar_host_writes_files_then_changes_nothing() -> None:
    host, managed = FakeHost("dock1"), dock1()
    FakeDocker(host)
    applied: list[str] = []

    def rules(cmd: str, _: bytes | None) -> CommandResult:
        applied.append(cmd.split()[-1])
        return CommandResult(0 if cmd.endswith("apply") or applied.count("apply") else 1, b"", b"")

    host.stub(rf"^{RULES_PATH} ", rules)
    from mesh.testing.fake_connector import FakeUnit
    host.units[WATCHER_UNIT] = FakeUnit()
    _, changes = drive(sidecar_host, host, managed, {})
    descriptions = [c.description for c in changes]
    assert "restart mesh-sidecars.service" in descriptions and "enable mesh-sidecars.service" in descriptions
    assert descriptions[-1] == "apply the reachability rules"
    assert yaml.safe_load(host.files[paths.MESH_ROOT + "/sidecars.list"].data or b"") is not None
    _, changes = drive(sidecar_host, host, managed, {})
    assert changes == []


def test_modules_register_under_mesh_names() -> None:
    made = registry.copy()
    register_container_modules(made)
    for name in ("mesh.sidecar_image", "mesh.sidecar", "mesh.sidecar_host"):
        assert made.resolve(name) is not None
    assert registry.resolve("mesh.sidecar") is None  # the shared registry is left alone


def test_sidecar_host_removes_only_mesh_sidecars_whose_workload_left() -> None:
    host, managed = FakeHost("dock1"), dock1()
    docker = FakeDocker(host)
    docker.add("api-v2-1", pid=500)  # the user's app: no mesh label, never touched
    docker.add("mesh-envoy-api-api-v2-1", pid=500, label="current")
    docker.add("mesh-envoy-old-3", pid=700, label="gone")
    host.stub(rf"^{RULES_PATH} ", CommandResult(0, b"", b""))
    from mesh.testing.fake_connector import FakeUnit
    host.units[WATCHER_UNIT] = FakeUnit(active="active", enabled=True)
    outcome, changes = drive(sidecar_host, host, managed, {})
    assert outcome.data["removed"] == ["mesh-envoy-old-3"]
    assert set(docker.containers) == {"api-v2-1", "mesh-envoy-api-api-v2-1"}
    assert [c.description for c in changes][-1] == "remove mesh-envoy-old-3"


# ---- published ports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bindings", "publish_all", "ports", "expected"), [
    ({}, False, {}, ()),
    (None, False, None, ()),
    ({}, False, {"9090/tcp": None}, ()),  # exposed (EXPOSE, --expose) but not published
    ({"9090/tcp": [{"HostIp": "", "HostPort": "8080"}]}, False,
     {"9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}, {"HostIp": "::", "HostPort": "8080"}]},
     ("9090/tcp -> 0.0.0.0:8080, :::8080",)),
    ({"9090/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}, False, {},  # stopped: as configured
     ("9090/tcp -> 127.0.0.1:8080",)),
    ({"53/udp": [{"HostIp": "", "HostPort": ""}]}, False, {}, ("53/udp -> :random",)),
    ({}, True, {"9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49153"}]}, ("9090/tcp -> 0.0.0.0:49153",)),
    ({}, True, {}, ("all exposed ports (-P) -> :random",)),
])
def test_published_ports_from_docker_inspect(bindings: Any, publish_all: Any, ports: Any,
                                             expected: tuple[str, ...]) -> None:
    assert published_ports(bindings, publish_all, ports) == expected


def test_an_app_container_that_publishes_ports_fails_its_workload_and_nothing_is_touched() -> None:
    host, managed = FakeHost("dock1"), dock1()
    docker = FakeDocker(host)
    docker.images.add(IMAGE)
    docker.add("api-v2-1", pid=500, bindings={"9090/tcp": [{"HostIp": "", "HostPort": "8080"}]},
               ports={"9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]})
    proxy_files(host)
    outcome, changes = drive(sidecar, host, managed, {"proxy": "api-api-v2-1", "image": IMAGE})
    assert outcome.failed and changes == []
    assert "'api-v2-1' on dock1 publishes port(s) 9090/tcp -> 0.0.0.0:8080" in outcome.msg, outcome.msg
    assert "never recreates or changes app containers" in outcome.msg
    assert outcome.data["published"] == ["9090/tcp -> 0.0.0.0:8080"]
    assert not any(cmd.startswith(("docker run", "docker rm", "docker restart", "docker stop", "chown"))
                   for cmd in host.commands)


# ---- what goes into the scripts ----------------------------------------------------------------------------


def _with_workload(host: ManagedHost, **changes: Any) -> ManagedHost:
    from dataclasses import replace
    return replace(host, workloads=(replace(host.workloads[0], **changes), *host.workloads[1:]))


@pytest.mark.parametrize("name", ["api\ntouch /root/x", "api'; touch /root/x; '", "api v2", "-api", "api$(id)",
                                  "api\n", "api\u2028x"])
def test_a_container_name_that_is_not_docker_s_is_refused_before_rendering(name: str) -> None:
    host = _with_workload(dock1(), container=name)
    for render in (lambda host: render_rules(host, ()), render_sidecar_list, sidecar_entries):
        with pytest.raises(UnsafeScript, match="container name"):
            render(host)  # type: ignore[operator]


@pytest.mark.parametrize("port", [0, 65536, -1, True, "9090"])
def test_a_port_out_of_range_is_refused_before_rendering(port: Any) -> None:
    with pytest.raises(UnsafeScript, match="expected 1-65535"):
        render_rules(_with_workload(dock1(), port=port), sources())


def test_the_host_name_never_reaches_a_rendered_file() -> None:
    from dataclasses import replace
    hostile = replace(dock1(), name="dock1\ntouch /root/x\n#")
    texts = [render_rules(hostile, sources()), render_watcher(hostile), render_sidecar_list(hostile), render_watcher_unit()]
    assert not any("touch /root/x" in text or "dock1" in text for text in texts)


def test_sidecar_host_fails_with_the_reason_and_changes_nothing_on_an_unsafe_name() -> None:
    host = FakeHost("dock1")
    FakeDocker(host)
    outcome, changes = drive(sidecar_host, host, _with_workload(dock1(), container="api'$(reboot)'"), {})
    assert outcome.failed and changes == [] and not host.puts
    assert "container name \"api'$(reboot)'\"" in outcome.msg and "nothing was changed" in outcome.msg


def test_checked_script_runs_sh_n_and_names_the_script() -> None:
    assert checked_script("ok.sh", "#!/bin/sh\necho fine\n") == "#!/bin/sh\necho fine\n"
    with pytest.raises(UnsafeScript, match=r"the rendered broken.sh is not valid shell \(`sh -n`: .+\)"):
        checked_script("broken.sh", "#!/bin/sh\nif true; then echo\n")
    with pytest.raises(UnsafeScript, match="does not start with #!/bin/sh"):
        checked_script("bash.sh", "#!/bin/bash\necho\n")
    with pytest.raises(UnsafeScript, match="NUL or carriage return"):
        checked_script("cr.sh", "#!/bin/sh\necho a\recho b\n")


def test_a_template_that_renders_broken_shell_never_leaves(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(GOLDEN.parents[2] / "templates", templates)
    watcher = templates / "containers" / "mesh-sidecars.sh.j2"
    watcher.write_text(watcher.read_text().replace("done\n", "", 1))  # a loop left open
    with pytest.raises(UnsafeScript, match="the rendered mesh-sidecars is not valid shell"):
        render_watcher(dock1(), templates)


def test_rules_close_each_app_port_in_its_namespace() -> None:
    text = render_rules(dock1(), sources())
    assert "APP_PORTS='api-v2-1 9090 20000\napi-v2-2 9090 20001\n'" in text
    assert "APP_CHAIN=MESH-APP" in text
    guards = app_guards((SidecarEntry("a", "mesh-envoy-x-0", 21000, 9090, 20000),
                         SidecarEntry("b", "mesh-envoy-y-1", 21001, 80, 20001),
                         SidecarEntry("a", "mesh-envoy-z-2", 21002, 8080, 20002)))
    assert guards == (AppGuard("a", (8080, 9090), (20000, 20002)), AppGuard("b", (80,), (20001,)))


# ---- the rules script in the app containers' namespaces, with fake docker, nsenter and iptables ---------------

_FAKE_IPTABLES = '''#!PYTHON
"""iptables, ip6tables and their -restore: a rule list per (namespace, family, table, chain) in a JSON file."""
import json, os, sys
tool = os.path.basename(sys.argv[0])
family = tool.replace("-restore", "")
ns = os.environ.get("FAKE_NS", "host")
state_path = os.path.join(os.environ["FAKE_DIR"], f"{ns}.{family}.json")
state = json.load(open(state_path)) if os.path.exists(state_path) else {}
with open(os.path.join(os.environ["FAKE_DIR"], "log"), "a") as log:
    log.write(f"{ns} {tool} {' '.join(sys.argv[1:])}\\n")
args = [a for a in sys.argv[1:] if a not in ("-w", "--noflush")]
table = "filter"
if args[:1] == ["-t"]:
    table, args = args[1], args[2:]
builtin = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}
code = 0
if tool.endswith("-restore"):
    for line in sys.stdin.read().splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            state[f"{table}/{line[1:].split()[0]}"] = []
        elif line.startswith("-A "):
            state.setdefault(f"{table}/{line.split()[1]}", []).append(line.strip())
else:
    op, chain, rest = args[0], args[1], args[2:]
    key = f"{table}/{chain}"
    if rest[:1] and rest[0].isdigit():
        rest = rest[1:]
    rule = " ".join(["-A", chain, *rest])
    rules = state.get(key)
    if op == "-C":
        code = 0 if rules and rule in rules else 1
    elif op == "-I":
        state.setdefault(key, []).insert(0, rule)
    elif op == "-D":
        code = 1 if not rules or rule not in rules else rules.remove(rule) or 0
    elif op == "-N":
        code = 1 if key in state else state.setdefault(key, []) and 0
    elif op == "-S":
        if rules is None and chain not in builtin:
            code = 1
        else:
            print(f"-P {chain} ACCEPT" if chain in builtin else f"-N {chain}")
            print("\\n".join(rules or []))
    elif op == "-F":
        code = 0 if key in state else 1
        state[key] = [] if key in state else None
        state = {k: v for k, v in state.items() if v is not None}
    elif op == "-X":
        code = 0 if state.pop(key, None) is not None else 1
json.dump(state, open(state_path, "w"))
sys.exit(code)
'''
_FAKE_DOCKER = '''#!PYTHON
"""docker container inspect -f FORMAT NAME: running containers and their pids from FAKE_DIR/running.json."""
import json, os, sys
running = json.load(open(os.path.join(os.environ["FAKE_DIR"], "running.json")))
pid = running.get(sys.argv[-1])
if sys.argv[1:3] != ["container", "inspect"] or pid is None:
    sys.exit(1)
print(pid if "Pid" in sys.argv[4] else f"172.18.0.{pid % 250} ")
'''
_FAKE_NSENTER = '#!/bin/sh\n[ "$1" = -t ] && [ "$3" = -n ] || exit 2\nFAKE_NS=$2 export FAKE_NS\nshift 3\nexec "$@"\n'
_FAKE_READLINK = '#!/bin/sh\necho "net:[$(echo "$1" | cut -d/ -f3)]"\n'


class FakeRulesHost:
    """The rendered rules script run by /bin/sh against fake docker, nsenter, iptables (ip6tables too)."""

    def __init__(self, folder: Path, running: dict[str, int], metrics_sources: tuple[str, ...] | None = None) -> None:
        self.folder = folder
        bin_dir = folder / "bin"
        bin_dir.mkdir()
        python = f"{sys.executable}"
        for name, text in (("iptables", _FAKE_IPTABLES), ("docker", _FAKE_DOCKER), ("nsenter", _FAKE_NSENTER),
                           ("readlink", _FAKE_READLINK)):
            (bin_dir / name).write_text(text.replace("PYTHON", python))
            (bin_dir / name).chmod(0o755)
        for alias in ("iptables-restore", "ip6tables", "ip6tables-restore"):
            (bin_dir / alias).symlink_to(bin_dir / "iptables")
        chosen = sources() if metrics_sources is None else metrics_sources
        script = render_rules(dock1(), chosen).replace("PATH=/usr/local/sbin", f"PATH={bin_dir}:/usr/local/sbin")
        self.script = folder / "sidecar-rules.sh"
        self.script.write_text(script.replace("/run/mesh/", f"{folder}/run/"))
        self.set_running(running)

    def set_running(self, running: dict[str, int]) -> None:
        (self.folder / "running.json").write_text(json.dumps(running))

    def run(self, verb: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/bin/sh", str(self.script), verb], capture_output=True, text=True, check=False,
                              env={**os.environ, "FAKE_DIR": str(self.folder)}, timeout=60)

    def rules(self, ns: int, family: str = "iptables") -> dict[str, list[str]]:
        path = self.folder / f"{ns}.{family}.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}


def test_rules_script_closes_app_ports_in_each_namespace_idempotently(tmp_path: Path) -> None:
    fake = FakeRulesHost(tmp_path, {"api-v2-1": 501})  # api-v2-2 is not running
    applied = fake.run("apply")
    assert applied.returncode == 0, applied.stderr
    assert "container api-v2-2 is not running: its port(s) 9090 are closed when it starts" in applied.stderr
    for family in ("iptables", "ip6tables"):
        rules = fake.rules(501, family)
        metrics = ["-A MESH-APP -s 10.0.0.3 -p tcp -m tcp --dport 20000 -j RETURN"] if family == "iptables" else []
        assert rules["filter/MESH-APP"] == ["-A MESH-APP -i lo -j RETURN", *metrics,
                                            "-A MESH-APP -p tcp -m tcp --dport 20000 -j DROP",
                                            "-A MESH-APP -p tcp -m tcp --dport 9090 -j DROP"], rules
        assert rules["filter/INPUT"] == ["-A INPUT -j MESH-APP"], rules
    assert fake.run("check").returncode == 0
    again = fake.run("apply")
    assert again.returncode == 0, again.stderr
    assert fake.rules(501)["filter/INPUT"] == ["-A INPUT -j MESH-APP"]  # no second jump
    assert len(fake.rules(501)["filter/MESH-APP"]) == 4  # refilled, not appended to
    # The app restarted: a new namespace without the chain; check says so until apply runs again.
    fake.set_running({"api-v2-1": 777})
    assert fake.run("check").returncode == 1
    assert fake.run("apply").returncode == 0
    assert fake.rules(777)["filter/INPUT"] == ["-A INPUT -j MESH-APP"] and fake.run("check").returncode == 0
    # Someone flushed the chain by hand: check notices.
    state = fake.rules(777)
    state["filter/MESH-APP"] = []
    (tmp_path / "777.iptables.json").write_text(json.dumps(state))
    assert fake.run("check").returncode == 1
    # The second app starts: check notices it has no chain yet.
    assert fake.run("apply").returncode == 0
    fake.set_running({"api-v2-1": 777, "api-v2-2": 900})
    assert fake.run("check").returncode == 1
    assert fake.run("apply").returncode == 0 and fake.run("check").returncode == 0
    assert fake.rules(900)["filter/MESH-APP"][-1] == "-A MESH-APP -p tcp -m tcp --dport 9090 -j DROP"


def test_rules_script_remove_takes_the_chain_out_of_every_namespace(tmp_path: Path) -> None:
    fake = FakeRulesHost(tmp_path, {"api-v2-1": 501, "api-v2-2": 502})
    assert fake.run("apply").returncode == 0
    removed = fake.run("remove")
    assert removed.returncode == 0, removed.stderr
    for ns in (501, 502):
        for family in ("iptables", "ip6tables"):
            rules = fake.rules(ns, family)
            assert "filter/MESH-APP" not in rules and not rules.get("filter/INPUT"), rules
    assert not (tmp_path / "run" / "sidecar-app-rules.applied").exists()
