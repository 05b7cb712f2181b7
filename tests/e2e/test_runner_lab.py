"""The playbook runner over real SSH on the lab's VMs: files with modes, templates, a systemd unit and its
handler, changed=0 on a second run, a failing host next to a good one, and a changed host key (exit 3).

The lab is shared with other work on this machine: the session holds /tmp/mesh-lab-dev.lock, brings the lab
up at the size these tests need (idempotent) and leaves it up for whoever tears it down.
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import subprocess
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from lab_helpers import LAB_ARGS, mesh

from mesh.deploy.hostvars import inventory_vars
from mesh.deploy.playbook import load_playbook
from mesh.deploy.recap import exit_code
from mesh.deploy.results import PlayResult
from mesh.deploy.runner import run_playbook
from mesh.hosts.connection import connect
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import ManagedHost
from mesh.inventory.validate import build_mesh

LOCK = "/tmp/mesh-lab-dev.lock"
SIZE = LAB_ARGS  # the shared lab's size: another would take it down
INVENTORY = Path(__file__).resolve().parents[2] / "inventory" / "lab.yaml"
UNIT = "mesh-e2e-sleep.service"
WORK = "/etc/mesh-e2e"

PLAYBOOK = f"""
- name: runner e2e
  hosts: vms
  gather_facts: false
  tasks:
    - name: work dir
      ansible.builtin.file: {{path: {WORK}, state: directory, mode: "0750"}}
    - name: a file with a mode
      ansible.builtin.copy: {{content: "hello {{{{ inventory_hostname }}}}\\n", dest: {WORK}/hello.txt, mode: "0640"}}
    - name: a template
      ansible.builtin.template: {{src: e2e.conf.j2, dest: {WORK}/e2e.conf, mode: "0644"}}
    - name: the unit
      ansible.builtin.copy:
        dest: /etc/systemd/system/{UNIT}
        content: |
          [Unit]
          Description=mesh runner e2e
          [Service]
          ExecStart=/bin/sleep infinity
          [Install]
          WantedBy=multi-user.target
      notify: restart e2e
    - name: unit running
      ansible.builtin.systemd_service: {{name: {UNIT}, state: started, enabled: true, daemon_reload: true}}
  handlers:
    - name: restart e2e
      ansible.builtin.systemd_service: {{name: {UNIT}, state: restarted}}
"""

FAILING = f"""
- hosts: vms
  tasks:
    - name: fails on vm2
      command: /bin/false
      when: inventory_hostname == 'vm2'
    - name: after
      file: {{path: {WORK}/after, state: touch}}
"""


# Module-scoped like every lab lock in tests/e2e: one process holding it across modules would wait on itself.
@pytest.fixture(scope="module")
def lab_hosts() -> Iterator[dict[str, ManagedHost]]:
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        up = mesh("lab", "up", *SIZE, "--inventory", str(INVENTORY), timeout=900)
        if up.returncode != 0 and "does not resize" in up.stderr:
            mesh("lab", "down", timeout=300)
            up = mesh("lab", "up", *SIZE, "--inventory", str(INVENTORY), timeout=900)
        if up.returncode != 0:
            pytest.fail(f"`mesh lab up` failed:\n{up.stdout}\n{up.stderr}")
        built = build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY))
        hosts = {name: built.host(name) for name in ("vm1", "vm2")}
        _clean(hosts.values())
        yield hosts
        _clean(hosts.values())
        # The lock is released here; the lab stays up for the lead to tear down.


def _clean(hosts: Iterable[ManagedHost]) -> None:
    for host in hosts:
        conn = connect(host)
        conn.run(f"systemctl disable --now {UNIT}; rm -rf {WORK} /etc/systemd/system/{UNIT}; "
                 "systemctl daemon-reload")
        conn.close()


def _run(tmp_path: Path, text: str, hosts: list[ManagedHost]) -> tuple[PlayResult, str]:
    (tmp_path / "templates").mkdir(exist_ok=True)
    (tmp_path / "templates" / "e2e.conf.j2").write_text(
        "host={{ inventory_hostname }}\nconsul={{ mesh_consul_url }}\n")
    path = tmp_path / "play.yml"
    path.write_text(textwrap.dedent(text))
    out = io.StringIO()
    inventory = inventory_vars(load_inventory(str(INVENTORY)))
    result = run_playbook(load_playbook(path), hosts, groups=inventory.groups, host_vars=inventory.host_vars,
                          output=out, color=False, templates_dir=tmp_path / "templates")
    print(out.getvalue())
    return result, out.getvalue()


def _on(host: ManagedHost, cmd: str) -> str:
    conn = connect(host)
    try:
        return conn.run(cmd).text()
    finally:
        conn.close()


def test_playbook_converges_and_second_run_changes_nothing(lab_hosts: dict[str, ManagedHost],
                                                            tmp_path: Path) -> None:
    hosts = list(lab_hosts.values())
    first, out = _run(tmp_path, PLAYBOOK, hosts)
    assert exit_code(first) == 0
    assert all(first.stats[name].changed == 6 for name in lab_hosts)  # 5 tasks and the handler
    assert out.count("RUNNING HANDLER [restart e2e]") == 1
    vm1, vm2 = lab_hosts["vm1"], lab_hosts["vm2"]
    assert _on(vm1, f"stat -c '%a %U' {WORK}/hello.txt {WORK}") == "640 root\n750 root"
    assert _on(vm2, f"cat {WORK}/hello.txt {WORK}/e2e.conf") == \
        "hello vm2\nhost=vm2\nconsul=http://10.77.0.2:8500"
    assert _on(vm1, f"systemctl is-active {UNIT}; systemctl is-enabled {UNIT}") == "active\nenabled"
    pids = {name: _on(host, f"systemctl show -p MainPID --value {UNIT}") for name, host in lab_hosts.items()}

    second, out = _run(tmp_path, PLAYBOOK, hosts)
    assert exit_code(second) == 0
    assert all(second.stats[name].changed == 0 and second.stats[name].ok == 5 for name in lab_hosts)
    assert "RUNNING HANDLER" not in out
    assert {name: _on(host, f"systemctl show -p MainPID --value {UNIT}") for name, host in lab_hosts.items()} == pids

    _on(vm2, f"echo '# edited' >> /etc/systemd/system/{UNIT}")
    third, out = _run(tmp_path, PLAYBOOK, hosts)
    assert (third.stats["vm1"].changed, third.stats["vm2"].changed) == (0, 2)  # the unit file and its handler
    assert "RUNNING HANDLER [restart e2e]" in out and out.count("[vm1]") == 5
    assert _on(vm1, f"systemctl show -p MainPID --value {UNIT}") == pids["vm1"]
    assert _on(vm2, f"systemctl show -p MainPID --value {UNIT}") != pids["vm2"]


def test_a_failing_host_leaves_the_other_done(lab_hosts: dict[str, ManagedHost], tmp_path: Path) -> None:
    _on(lab_hosts["vm1"], f"mkdir -p {WORK}")
    _on(lab_hosts["vm2"], f"mkdir -p {WORK}")
    result, out = _run(tmp_path, FAILING, list(lab_hosts.values()))
    assert exit_code(result) == 2 and result.failed_hosts == ["vm2"]
    assert "fatal: [vm2]: FAILED! =>" in out and '"rc": 1' in out
    assert _on(lab_hosts["vm1"], f"test -e {WORK}/after && echo yes") == "yes"
    assert _on(lab_hosts["vm2"], f"test -e {WORK}/after && echo yes || echo no") == "no"


def test_changed_and_unknown_host_keys_make_the_host_unreachable(lab_hosts: dict[str, ManagedHost],
                                                                  tmp_path: Path) -> None:
    vm1 = lab_hosts["vm1"]
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{vm1.connection.address} {(tmp_path / 'other.pub').read_text().split(' ')[0]} "
                     f"{(tmp_path / 'other.pub').read_text().split(' ')[1]}\n")
    changed = dataclasses.replace(vm1, connection=dataclasses.replace(vm1.connection, known_hosts=str(wrong)))
    result, out = _run(tmp_path, FAILING.replace("/bin/false", "/bin/true"), [changed, lab_hosts["vm2"]])
    assert exit_code(result) == 3 and result.unreachable_hosts == ["vm1"]
    assert "fatal: [vm1]: UNREACHABLE! =>" in out and "CHANGED" in out and str(wrong) in out
    assert "SHA256:" in out and result.stats["vm2"].failed == 0 and result.stats["vm2"].ok == 2

    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    unknown = dataclasses.replace(vm1, connection=dataclasses.replace(vm1.connection, known_hosts=str(empty)))
    result, out = _run(tmp_path, FAILING, [unknown])
    assert exit_code(result) == 3 and "is not in" in out and str(empty) in out
