"""What goes into a node's own writable layer before it boots: identity, SSH keys, units and the demo apps.
It writes files under a mounted layer only; mounting, booting and the network belong to nodes.py and network.py.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from mesh.lab import consul_acl, demo_units
from mesh.lab.errors import run
from mesh.lab.topology import Node, Workload

DEMO_DIR = "opt/mesh-demo"
IMAGES_IN_NODE = "/opt/mesh-lab-images"
CONSUL_IN_NODE = "/usr/local/bin/consul"
CONSUL_ACL_IN_NODE = "/etc/consul.d/acl.hcl"  # 0600: holds the lab's master token
DOCKER_UNITS = ("docker.service", "docker.socket", "containerd.service")
# Units that only make sense on a real machine, or would try to reach the network
QUIET_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service",
               "systemd-networkd-wait-online.service")

CGROUPS_RW_SCRIPT = """#!/bin/sh
# nspawn mounts the host's cgroup v1 controllers read-only (there is no cgroup namespace on v1), and runc
# needs them writable. Most can be remounted; a busy one (memory) is mounted afresh.
for dir in /sys/fs/cgroup/*; do
    [ -d "$dir" ] && [ ! -L "$dir" ] || continue
    name=$(basename "$dir")
    case "$name" in unified|systemd) continue ;; esac
    mount -o remount,rw "$dir" 2>/dev/null && continue
    umount -l "$dir" && mount -t cgroup -o "$name" cgroup "$dir"
done
"""

DOCKER_DROPIN = """[Service]
ExecStartPre=/usr/local/sbin/mesh-lab-cgroups-rw
"""

CONSUL_UNIT = """[Unit]
Description=Consul server agent (mesh lab)
After=network.target

[Service]
ExecStart={binary} agent -server -bootstrap-expect=1 -ui -client 0.0.0.0 -bind {address} -node {name} \\
    -data-dir /var/lib/consul -config-file {acl}
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""

CONTAINERS_UNIT = """[Unit]
Description=Demo app containers (mesh lab)
Requires=docker.service
After=docker.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/mesh-demo-containers

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class Images:
    """The cached artifacts a lab boots from (images.py builds them)."""

    rootfs: Path
    consul: Path
    app_tar: Path
    app_image: str  # the tag the app tarball is imported as on the container host
    demoapp: Path


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def _enable(root: Path, unit: str, target: str = "multi-user.target") -> None:
    source = f"/etc/systemd/system/{unit}"
    if not (root / source.lstrip("/")).exists():
        source = f"/lib/systemd/system/{unit}"
    _link(root / f"etc/systemd/system/{target}.wants/{unit}", source)


def _mask(root: Path, unit: str) -> None:
    for wants in (root / "etc/systemd/system").glob(f"*.wants/{unit}"):
        wants.unlink()
    _link(root / "etc/systemd/system" / unit, "/dev/null")


def write_identity(root: Path, node: Node, authorized_key: str) -> str:
    """Hostname, machine id, its own SSH host key and the lab's authorized key; returns the host public key."""
    _write(root / "etc/hostname", f"{node.name}\n")
    _write(root / "etc/hosts", f"127.0.0.1\tlocalhost\n{node.address}\t{node.name}\n"
                               "::1\tlocalhost ip6-localhost ip6-loopback\n")
    _write(root / "etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    ssh_dir = root / "etc/ssh"
    for old in ssh_dir.glob("ssh_host_*"):
        old.unlink()
    key = ssh_dir / "ssh_host_ed25519_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{node.name}", "-f", str(key)])
    _write(ssh_dir / "sshd_config.d/mesh-lab.conf",
           "HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\nUseDNS no\n")
    root_ssh = root / "root/.ssh"
    root_ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(root_ssh / "authorized_keys", authorized_key.strip() + "\n", 0o600)
    key_type, key_text = (ssh_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    return f"{key_type} {key_text}"


def demo_instance(node: Node, workload: Workload) -> demo_units.DemoInstance:
    kind = "container" if workload.container else "vm"
    upstreams = tuple((u.service, "127.0.0.1", u.local_port) for u in workload.upstreams)
    return demo_units.DemoInstance(service=workload.service, version=workload.version, port=workload.port,
                                   host=node.name, instance=workload.container or node.name, kind=kind,
                                   upstreams=upstreams, bind="127.0.0.1" if workload.spare else "0.0.0.0")


def write_services(root: Path, node: Node, images: Images, consul_master_token: str | None = None) -> None:
    """Units per role, enabled offline so they start with the node's first boot. Consul runs with ACLs on
    (deny by default) and the lab's master token, which lifecycle.py keeps in the lab's state."""
    for unit in QUIET_UNITS:
        _mask(root, unit)
    if node.role != "container_host":
        for unit in DOCKER_UNITS:
            _mask(root, unit)
    if node.role == "consul":
        if not consul_master_token:
            raise ValueError("the lab's Consul needs its master token")
        _write(root / CONSUL_ACL_IN_NODE.lstrip("/"), consul_acl.agent_acl_config(consul_master_token), 0o600)
        _write(root / "etc/systemd/system/consul.service",
               CONSUL_UNIT.format(binary=CONSUL_IN_NODE, address=node.address, name=node.name,
                                  acl=CONSUL_ACL_IN_NODE))
        _enable(root, "consul.service")
    if node.role == "vm":
        _copy_demoapp(root, images)
        for workload in node.workloads:
            instance = demo_instance(node, workload)
            unit = demo_units.unit_name(instance)
            _write(root / "etc/systemd/system" / unit, demo_units.render_unit(instance))
            _enable(root, unit)
    if node.role == "container_host":
        _write(root / "usr/local/sbin/mesh-lab-cgroups-rw", CGROUPS_RW_SCRIPT, 0o755)
        _write(root / "etc/systemd/system/docker.service.d/mesh-lab.conf", DOCKER_DROPIN)
        for unit in ("containerd.service", "docker.service"):
            _unmask(root, unit)
            _enable(root, unit)
        _write(root / "usr/local/sbin/mesh-demo-containers", containers_script(node, images), 0o755)
        _write(root / "etc/systemd/system/mesh-demo-containers.service", CONTAINERS_UNIT)
        _enable(root, "mesh-demo-containers.service")


def _unmask(root: Path, unit: str) -> None:
    path = root / "etc/systemd/system" / unit
    if path.is_symlink() and os.readlink(path) == "/dev/null":
        path.unlink()


def _copy_demoapp(root: Path, images: Images) -> None:
    target = root / DEMO_DIR / "demoapp.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(images.demoapp, target)


def containers_script(node: Node, images: Images) -> str:
    """Import the app image, make the network and run each container once; Docker restarts them after that."""
    import shlex

    tar = f"{IMAGES_IN_NODE}/{images.app_tar.name}"
    lines = ["#!/bin/sh", "set -e",
             f"docker image inspect {images.app_image} >/dev/null 2>&1 || docker import {tar} {images.app_image}",
             (f"docker network inspect {demo_units.DOCKER_NETWORK} >/dev/null 2>&1 || "
              f"docker network create {demo_units.DOCKER_NETWORK} >/dev/null")]
    for workload in node.workloads:
        instance = demo_instance(node, workload)
        argv = ["docker", *demo_units.docker_run_args(instance, images.app_image)]
        lines.append(f"docker container inspect {workload.container} >/dev/null 2>&1 || "
                     + " ".join(shlex.quote(arg) for arg in argv) + " >/dev/null")
    return "\n".join(lines) + "\n"
