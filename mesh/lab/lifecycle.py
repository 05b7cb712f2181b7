"""The lab as one object: `Lab(paths).up(size)`, `.down()`, `.status()`, `.exec()`, from any clone of the repo.
It sequences the parts (network.py, layers.py, nodes.py, cleanup.py) and keeps the record; it renders nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from mesh.lab import cleanup, consul_acl, network, nodes
from mesh.lab.errors import LabError, require_tools
from mesh.lab.layers import Images, write_identity, write_services
from mesh.lab.ssh import LabSsh, make_key_pair, write_known_hosts
from mesh.lab.state import LabPaths, LabRecord, NodeRecord, load_record, locked, save_record
from mesh.lab.topology import (
    BRIDGE,
    HOST_ADDRESS,
    INVENTORY_HEADER,
    SUBNET,
    LabSize,
    Node,
    Topology,
    build_topology,
    consul_url,
    render_inventory,
)

Progress = Callable[[str], None]
log = structlog.get_logger("mesh.lab")
BOOT_TIMEOUT = 60.0
SERVICES_TIMEOUT = 90.0
MIN_FREE_BYTES = 1 << 30
PREFIX = int(SUBNET.split("/")[1])
CONSUL_MASTER_TOKEN = "consul-master-token"  # in the lab's state dir, 0600: Consul's bootstrap token
CONSUL_MESH_TOKEN = "consul-mesh-token"  # in the lab's state dir, 0600: the inventory's mesh_consul_token_file


@dataclass(frozen=True)
class UpResult:
    changes: tuple[str, ...]
    seconds: float
    inventory: Path


def preflight() -> None:
    """Linux, root, the host commands and kernel features the lab needs, each named with its package."""
    if not sys.platform.startswith("linux"):
        raise LabError("mesh lab runs on Linux only (it boots systemd-nspawn containers)")
    if os.geteuid() != 0:
        raise LabError("mesh lab must run as root (network namespaces, mounts, nspawn)", hint="use sudo")
    require_tools("systemd-nspawn", "ip", "ssh", "ssh-keygen", "mount", "umount")
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise LabError("the kernel has no overlay filesystem", hint="modprobe overlay")
    if not Path("/proc/self/ns/net").exists():
        raise LabError("the kernel has no network namespaces (CONFIG_NET_NS)")


def load_images(progress: Progress) -> Images:
    from mesh.lab import demo_units, images

    rootfs = images.ensure_node_rootfs(progress=progress)
    return Images(rootfs=rootfs, consul=images.ensure_consul_binary(progress=progress),
                  app_tar=images.ensure_app_image_tar(progress=progress),
                  app_image=demo_units.image_name(images.app_image_key()), demoapp=images.demoapp_source())


class Lab:
    """One lab on this machine, found through its state directory."""

    def __init__(self, paths: LabPaths, progress: Progress = lambda message: None,
                 image_loader: Callable[[Progress], Images] = load_images) -> None:
        self.paths = paths
        self.progress = progress
        self.image_loader = image_loader
        self.ssh = LabSsh(paths.private_key, paths.known_hosts)
        self._record_lock = threading.Lock()

    def files(self, name: str) -> nodes.NodeFiles:
        return nodes.NodeFiles(self.paths.node_dir(name))

    def record(self) -> LabRecord | None:
        return load_record(self.paths)

    def topology(self, record: LabRecord) -> Topology:
        return build_topology(LabSize(record.vms, record.containers, record.controllers))

    @property
    def consul_master_token_file(self) -> Path:
        return self.paths.root / CONSUL_MASTER_TOKEN

    @property
    def consul_mesh_token_file(self) -> Path:
        return self.paths.root / CONSUL_MESH_TOKEN

    # ---- up -------------------------------------------------------------------------------------------

    def up(self, size: LabSize, inventory: Path) -> UpResult:
        started = time.monotonic()
        size.check()
        preflight()
        topology = build_topology(size)
        with locked(self.paths):
            record = self._existing(size, inventory)
            changes: list[str] = []
            if record is None:
                network.check_free(BRIDGE, SUBNET)
                cleanup.check_free_space(self.paths.root, MIN_FREE_BYTES)
                record = LabRecord(size.vms, size.containers, size.controllers, BRIDGE, SUBNET, str(inventory))
                save_record(self.paths, record)
                changes.append("lab created")
            images = self.image_loader(self.progress)
            record.complete = False
            record.inventory = str(inventory)
            save_record(self.paths, record)
            if not self.paths.private_key.exists():
                make_key_pair(self.paths.private_key)
                changes.append("lab SSH key pair")
            for token_file in (self.consul_master_token_file, self.consul_mesh_token_file):
                if not token_file.exists():
                    consul_acl.ensure_secret(token_file)
                    changes.append(f"Consul token {token_file.name}")
            if network.ensure_bridge(BRIDGE, HOST_ADDRESS, PREFIX):
                changes.append(f"bridge {BRIDGE}")
            self.progress(f"starting {len(topology.nodes)} nodes")
            with ThreadPoolExecutor(max_workers=len(topology.nodes)) as pool:
                results = list(pool.map(lambda node: self._start_node(record, node, images), topology.nodes))
            for node_changes, _key in results:
                changes += node_changes
            write_known_hosts(self.paths.known_hosts,
                              {node.address: key for node, (_c, key) in zip(topology.nodes, results, strict=True)})
            self.progress("waiting for sshd on every node")
            with ThreadPoolExecutor(max_workers=len(topology.nodes)) as pool:
                list(pool.map(lambda node: nodes.wait_for_sshd(
                    node, self.files(node.name), record.nodes[node.name], BOOT_TIMEOUT), topology.nodes))
            self.progress("waiting for Consul and the demo containers")
            self._wait_for_services(topology)
            if self._write_inventory(topology, inventory):
                changes.append(f"inventory {inventory}")
            record.complete = True
            save_record(self.paths, record)
        return UpResult(tuple(changes), time.monotonic() - started, inventory)

    def _existing(self, size: LabSize, inventory: Path) -> LabRecord | None:
        """The record to continue from: none, or a lab of this size; an interrupted other lab is removed."""
        record = self.record()
        if record is None:
            if network.lab_netns_names() or self.paths.nodes.exists():
                self.progress("found leftovers of an earlier lab with no record: removing them")
                self._teardown(None)
            return None
        if record.sizes() == (size.vms, size.containers, size.controllers):
            return record
        if record.complete:
            raise LabError(
                f"a lab with {record.vms} VMs, {record.containers} containers and {record.controllers} "
                f"controller(s) is up; this lab does not resize in place",
                hint="run `mesh lab down` first, then `mesh lab up` with the new sizes")
        self.progress("found an interrupted `mesh lab up` of another size: removing it")
        self._teardown(record)
        return None

    def _start_node(self, record: LabRecord, node: Node, images: Images) -> tuple[list[str], str]:
        files = self.files(node.name)
        changes: list[str] = []
        with self._record_lock:
            entry = record.nodes.get(node.name) or NodeRecord(node.name, node.role, node.address, node.netns,
                                                              node.veth, str(files.root))
            record.nodes[node.name] = entry
            save_record(self.paths, record)
        if network.ensure_node_link(node.netns, node.veth, BRIDGE, node.address, PREFIX):
            changes.append(f"{node.name}: network namespace")
        if not files.prepared.exists() and files.upper.exists():
            # a layer whose preparation was interrupted is never trusted: start it again from empty
            nodes.unmount_all(files.base)
            shutil.rmtree(files.upper)
            shutil.rmtree(files.work, ignore_errors=True)
        if nodes.mount_layer(files, images.rootfs):
            changes.append(f"{node.name}: layer mounted")
        if not files.prepared.exists():
            host_key = write_identity(files.root, node, self.paths.public_key.read_text())
            write_services(files.root, node, images, self._master_token())
            files.prepared.write_text(host_key + "\n")
            changes.append(f"{node.name}: layer prepared")
        if not nodes.running(entry, files):
            if nodes.nspawn_pid(files) is not None:
                raise LabError(f"{node.name} runs without its supervisor", hint="run `mesh lab down` first")
            argv, env = nodes.nspawn_command(node, files, images)
            pid, start = nodes.start_supervisor(self.paths, files, argv, env)
            with self._record_lock:
                entry.supervisor_pid, entry.supervisor_start = pid, start
                save_record(self.paths, record)
            log.info("node started", node=node.name, supervisor=pid)
            changes.append(f"{node.name}: started")
        return changes, files.prepared.read_text().strip()

    def _wait_for_services(self, topology: Topology) -> None:
        consul = topology.node("consul1")
        dock = topology.node("dock1")
        names = [w.container for w in dock.workloads if w.container]
        checks = [(consul, "curl -sf http://127.0.0.1:8500/v1/status/leader | grep -q :8300", "Consul's leader")]
        if names:
            script = "&&".join(f"[ \"$(docker inspect -f '{{{{.State.Running}}}}' {n} 2>/dev/null)\" = true ]"
                               for n in names)
            checks.append((dock, script, "the demo containers"))
        deadline = time.monotonic() + SERVICES_TIMEOUT
        for node, script, what in checks:
            while self.ssh.run(node.address, [script], timeout=15).returncode != 0:
                if time.monotonic() > deadline:
                    raise LabError(f"{node.name}: {what} did not come up within {SERVICES_TIMEOUT:.0f} s",
                                   hint=f"mesh lab exec {node.name} -- journalctl -b")
                time.sleep(0.3)
        self._ensure_mesh_token(deadline)

    def _master_token(self) -> str:
        return consul_acl.ensure_secret(self.consul_master_token_file)

    def _ensure_mesh_token(self, deadline: float) -> None:
        """Consul's ACLs take the master token shortly after the leader is elected; then the policy `mesh` and
        the inventory's token (both idempotent, from this machine, tokens in headers only)."""
        try:
            consul_acl.ensure_mesh_token(consul_url(), self._master_token(),
                                         consul_acl.ensure_secret(self.consul_mesh_token_file),
                                         timeout=max(5.0, deadline - time.monotonic()))
        except consul_acl.AclNotReady as exc:
            raise LabError(f"consul1: {exc}", hint="mesh lab exec consul1 -- journalctl -u consul") from None

    def _write_inventory(self, topology: Topology, inventory: Path) -> bool:
        text = render_inventory(topology, self.paths.private_key, self.paths.known_hosts,
                                self.consul_mesh_token_file)
        if inventory.exists() and inventory.read_text() == text:
            return False
        inventory.parent.mkdir(parents=True, exist_ok=True)
        inventory.write_text(text)
        return True

    # ---- down -----------------------------------------------------------------------------------------

    def down(self) -> list[str]:
        preflight()
        with locked(self.paths):
            return self._teardown(self.record())

    def _teardown(self, record: LabRecord | None) -> list[str]:
        """Remove everything the lab made, from its record and from its marks (leftovers without a record)."""
        removed: list[str] = []
        entries = list(record.nodes.values()) if record else []
        if entries:
            self.progress(f"stopping {len(entries)} nodes")
            with ThreadPoolExecutor(max_workers=len(entries)) as pool:
                list(pool.map(lambda e: nodes.stop_node(e, self.files(e.name)), entries))
            removed.append(f"{len(entries)} nodes stopped")
        removed += cleanup.kill_leftover_processes(self.paths)
        removed += [f"mount {point}" for point in nodes.unmount_all(self.paths.nodes)]
        for entry in entries:
            removed += network.delete_node_link(entry.netns, entry.veth)
        removed += network.delete_leftovers(record.bridge if record else BRIDGE)
        removed += cleanup.remove_cgroups()
        removed += cleanup.remove_envoy_shm()
        if record:
            removed += cleanup.restore_sysctls(record.sysctls)
            inventory = Path(record.inventory)
            if inventory.exists() and inventory.read_text().startswith(INVENTORY_HEADER):
                inventory.unlink()
                removed.append(f"inventory {inventory}")
        removed += cleanup.remove_state_files(self.paths)
        return removed

    # ---- status and exec ------------------------------------------------------------------------------

    def require_record(self) -> LabRecord:
        record = self.record()
        if record is None:
            raise LabError("no lab is up on this machine", hint="mesh lab up")
        return record

    def exec(self, host: str, command: Sequence[str]) -> int:
        record = self.require_record()
        node = self.topology(record).node(host)
        return self.ssh.interactive(node.address, command)
