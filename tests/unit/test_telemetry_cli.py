"""The telemetry commands as a user runs them: `mesh logs` with a host that answers (run locally, a fake
journalctl on PATH) and one that does not (exit 3, named on stderr), bad options (exit 5), `mesh metrics
targets` on stdout or written to a file, `mesh top` refusing a bad interval."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from telemetry_samples import access

from mesh.cli import run
from mesh.errors import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE

INVENTORY = """\
all:
  vars:
    mesh_trust_domain: lab.mesh
    mesh_consul_url: http://127.0.0.1:1
    mesh_state_dir: state
    ansible_ssh_common_args: -o UserKnownHostsFile={known_hosts}
  children:
    mesh_controllers:
      hosts:
        ctl1: {{ansible_host: 127.0.0.1, ansible_port: {closed}}}
    vms:
      hosts:
        vm1:
          ansible_connection: local
          mesh_workloads:
            - {{service: web, port: 8080, upstreams: [{{service: api, local_port: 19101}}]}}
        vm2:
          ansible_host: 127.0.0.1
          ansible_port: {closed}
          mesh_workloads:
            - {{service: api, port: 9090}}
"""


def closed_port() -> int:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return int(free.getsockname()[1])


@pytest.fixture
def inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """vm1 runs here (a journalctl on PATH prints two access lines, newest first), vm2 refuses SSH."""
    (tmp_path / "known_hosts").write_text("")
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY.format(known_hosts=tmp_path / "known_hosts", closed=closed_port()))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lines = tmp_path / "journal.txt"
    lines.write_text("\n".join(["-- Boot 1 --", access("2099-01-01T00:00:02Z", request_id="second"),
                                access("2099-01-01T00:00:01Z", request_id="first")]) + "\n")
    journalctl = bin_dir / "journalctl"
    journalctl.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/journalctl.args\ncat {lines}\n')
    journalctl.chmod(journalctl.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("MESH_INVENTORY", raising=False)
    return path


def test_logs_prints_what_was_read_then_names_the_unreachable_host_and_exits_3(
        inventory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["logs", "-i", str(inventory), "--json", "--since", "2098-12-31T23:00:00Z"]) == EXIT_UNREACHABLE
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(line["request_id"], line["source_service"]) for line in lines] == [("first", "web"), ("second", "web")]
    assert err.startswith("ERROR: vm2: cannot connect to 127.0.0.1:")
    args = (inventory.parent / "journalctl.args").read_text().split()
    assert args[:2] == ["-u", "mesh-envoy-web-8080.service"] and "--since" in args


def test_logs_of_the_host_that_answers_exit_0_in_readable_lines(inventory: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["logs", "-i", str(inventory), "--host", "vm1", "--since", "1d"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "2099-01-01T00:00:01.000Z web-vm1-8080 outbound web -> api GET / 200 3ms id=first",
        "2099-01-01T00:00:02.000Z web-vm1-8080 outbound web -> api GET / 200 3ms id=second"]
    assert err == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "yesterday"], "Invalid value for --since: 'yesterday' is neither a duration"),
    (["--host", "vm3"], "ERROR: host 'vm3' is not in the inventory (did you mean 'vm2' or 'vm1'?)"),
    (["--service", "dbb"], "ERROR: no service 'dbb' in the inventory"),
    (["--follow=yes"], "Error: Option '--follow' does not take a value."),
])
def test_bad_options_exit_5_with_a_message(inventory: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                           message: str) -> None:
    assert run(["logs", "-i", str(inventory), *args]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_without_an_inventory_the_commands_say_so_and_exit_5(inventory: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["logs"], ["metrics", "targets"], ["top", "--once"]):
        assert run(command) == EXIT_USAGE
        assert "no inventory: give INVENTORY or -i PATH, or set MESH_INVENTORY" in capsys.readouterr().err


def test_metrics_targets_prints_file_sd_or_writes_it(inventory: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_INVENTORY", str(inventory))
    assert run(["metrics", "targets"]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert [(entry["targets"], entry["labels"]["mesh_proxy"]) for entry in printed] == [
        (["vm1:20000"], "web-8080"), (["127.0.0.1:20000"], "api-9090")]
    written = inventory.parent / "sd" / "mesh.json"
    written.parent.mkdir()
    assert run(["metrics", "targets", "-o", str(written)]) == EXIT_OK
    assert json.loads(written.read_text()) == printed and capsys.readouterr().out == ""
    assert sorted(os.listdir(written.parent)) == ["mesh.json"]  # no temp file left
    assert run(["metrics", "targets", "-o", str(inventory.parent / "nowhere" / "mesh.json")]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_top_refuses_an_interval_below_half_a_second(inventory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["top", "-i", str(inventory), "--interval", "0"]) == EXIT_USAGE
    assert "Invalid value for '--interval'" in capsys.readouterr().err
