"""End to end: `mesh lab up --vms 2 --containers 1 --controllers 2` on this machine, what runs in it, and `down` leaving the
machine as it was. Root only; a lab that cannot start fails these tests. The last test takes the lab down.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from lab_helpers import LAB_ARGS, MESH, LabUp, machine_state, mesh

RUNNING_TIMEOUT = 60.0


def _wait(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def test_inventory_has_every_node(lab: LabUp) -> None:
    assert set(lab.hosts) == {"consul1", "ctl1", "ctl2", "vm1", "vm2", "dock1"}


def test_ssh_with_strict_host_key_checking(lab: LabUp, tmp_path: Path) -> None:
    keys = set()
    for host in lab.hosts:
        result = lab.ssh(host, "hostname; cat /etc/ssh/ssh_host_ed25519_key.pub")
        assert result.returncode == 0, f"{host}: {result.stderr}"
        name, key = result.stdout.splitlines()[:2]
        assert name == host
        keys.add(key.split()[1])
    assert len(keys) == len(lab.hosts), "two nodes share an SSH host key"
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    refused = subprocess.run(lab.ssh_argv("vm1", "true", known_hosts=empty), capture_output=True, text=True,
                             check=False)
    assert refused.returncode == 255, "an unknown host key was accepted"


def test_every_node_is_running(lab: LabUp) -> None:
    def all_running() -> bool:
        return all(lab.ssh(h, "systemctl is-system-running").stdout.strip() == "running" for h in lab.hosts)

    _wait(all_running, RUNNING_TIMEOUT, "`systemctl is-system-running` did not say running on every node")


def test_docker_ps_lists_the_app_container(lab: LabUp) -> None:
    result = lab.ssh("dock1", "docker ps --format '{{.Names}} {{.Ports}}'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["api-v2-1"], "the container runs and publishes no port"


def test_consul_catalog_answers(lab: LabUp) -> None:
    url = f"http://{lab.hosts['consul1']}:8500/v1/catalog/nodes"
    with urllib.request.urlopen(url, timeout=5) as answer:  # ACLs deny by default: anonymous sees nothing
        assert json.load(answer) == []
    token = (lab.state_dir / "consul-mesh-token").read_text().strip()  # the inventory's mesh_consul_token_file
    assert oct((lab.state_dir / "consul-mesh-token").stat().st_mode & 0o777) == "0o600"
    request = urllib.request.Request(url, headers={"X-Consul-Token": token})
    with urllib.request.urlopen(request, timeout=5) as answer:
        nodes = json.load(answer)
    assert [node["Node"] for node in nodes] == ["consul1"]


def _hops(lab: LabUp, host: str, command: str) -> list[dict[str, str]]:
    result = lab.ssh(host, command)
    assert result.returncode == 0, f"{host}: {result.stderr}"
    return json.loads(result.stdout)["hops"]


def test_demo_apps_answer_naming_the_unreachable_upstream(lab: LabUp) -> None:
    web = _hops(lab, "vm1", "curl -sf http://127.0.0.1:8080/")
    assert web[0] == {"service": "web", "version": "v1", "host": "vm1", "instance": "vm1", "kind": "vm"}
    assert web[1]["service"] == "api" and "error" in web[1]
    api = _hops(lab, "vm2", "curl -sf http://127.0.0.1:9090/")
    assert api[0] == {"service": "api", "version": "v1", "host": "vm2", "instance": "vm2", "kind": "vm"}
    assert api[1]["service"] == "db" and "error" in api[1]
    script = ("import socket; s = socket.create_connection(('127.0.0.1', 5432)); s.sendall(b'hello\\n'); "
              "print(s.makefile().readline(), end='')")
    db = lab.ssh("vm2", f'python3 -c "{script}"')
    assert json.loads(db.stdout) == {"service": "db", "version": "v1", "host": "vm2", "instance": "vm2",
                                     "kind": "vm"}
    fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9090/').read().decode())"
    container = _hops(lab, "dock1", f'docker exec api-v2-1 python3 -c "{fetch}"')
    assert container[0] == {"service": "api", "version": "v2", "host": "dock1", "instance": "api-v2-1",
                            "kind": "container"}
    assert container[1]["service"] == "db" and "error" in container[1]


def test_inventory_is_read_alike_by_mesh_and_ansible(lab: LabUp, tmp_path: Path) -> None:
    check = mesh("inventory", "check", str(lab.inventory))
    assert check.returncode == 0, check.stdout + check.stderr
    env = dict(os.environ, ANSIBLE_INVENTORY_UNPARSED_FAILED="true", ANSIBLE_HOST_KEY_CHECKING="true")
    ansible_bin = Path(MESH).parent
    listed = subprocess.run([str(ansible_bin / "ansible-inventory"), "-i", str(lab.inventory), "--list"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    groups = json.loads(listed.stdout)
    assert set(groups["vms"]["hosts"]) == {"vm1", "vm2"}
    assert groups["containers"]["hosts"] == ["dock1"]
    assert groups["mesh_controllers"]["hosts"] == ["ctl1", "ctl2"]
    assert groups["consul"]["hosts"] == ["consul1"]
    assert groups["monitoring"]["children"] == ["consul"]  # mesh_metrics_scrapers: [monitoring]
    ping = subprocess.run([str(ansible_bin / "ansible"), "all", "-i", str(lab.inventory), "-m", "ping"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, check=False, timeout=120)
    assert ping.returncode == 0, ping.stdout + ping.stderr


def test_exec_passes_exit_code_and_stdin(lab: LabUp) -> None:
    result = mesh("lab", "exec", "vm1", "--", "sh", "-c", "cat; exit 7", input="through stdin\n")
    assert result.returncode == 7
    assert result.stdout == "through stdin\n"
    assert mesh("lab", "exec", "dock1", "--", "true").returncode == 0


def test_status_shows_every_node(lab: LabUp) -> None:
    result = mesh("lab", "status")
    assert result.returncode == 0, result.stderr
    for host, address in lab.hosts.items():
        assert host in result.stdout and address in result.stdout
    assert "DOWN" not in result.stdout


def test_reboot_comes_back_with_its_state(lab: LabUp) -> None:
    assert lab.ssh("vm2", "echo kept > /root/before-reboot && touch /run/this-boot").returncode == 0
    lab.ssh("vm2", "systemctl reboot")
    _wait(lambda: lab.ssh("vm2", "test -e /run/this-boot", timeout=10).returncode == 1, 30, "vm2 did not reboot")
    _wait(lambda: lab.ssh("vm2", "systemctl is-system-running", timeout=10).stdout.strip() == "running",
          RUNNING_TIMEOUT, "vm2 did not come back running")
    assert lab.ssh("vm2", "cat /root/before-reboot").stdout == "kept\n"
    assert json.loads(lab.ssh("vm2", "curl -sf http://127.0.0.1:9090/").stdout)["hops"][0]["service"] == "api"


def test_second_up_changes_nothing(lab: LabUp) -> None:
    record = (lab.state_dir / "lab.json").read_text()
    result = mesh("lab", "up", *LAB_ARGS, "--inventory", str(lab.inventory))
    assert result.returncode == 0, result.stderr
    assert "nothing changed" in result.stdout
    assert json.loads((lab.state_dir / "lab.json").read_text())["nodes"] == json.loads(record)["nodes"]


def test_up_of_another_size_refuses(lab: LabUp) -> None:
    result = mesh("lab", "up", "--vms", "3", "--containers", "1", "--inventory", str(lab.inventory))
    assert result.returncode == 1
    assert "mesh lab down" in result.stderr


def test_down_leaves_nothing_behind(lab: LabUp) -> None:
    result = mesh("lab", "down", timeout=180)
    assert result.returncode == 0, result.stderr
    after = machine_state()
    before = lab.before
    assert after.netns == before.netns
    assert after.links == before.links
    assert after.mounts == before.mounts
    assert after.nft == before.nft
    assert after.cgroups == before.cgroups
    assert after.shm <= before.shm
    lab_words = ("systemd-nspawn", "mesh-lab", "consul agent", "dockerd", "containerd", "demoapp.py")
    left = [cmd for _pid, cmd, contained in after.processes - before.processes
            if contained or any(word in cmd for word in lab_words)]
    assert left == []
    assert not lab.inventory.exists()
