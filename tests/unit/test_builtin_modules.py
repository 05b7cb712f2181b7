"""The builtin modules on a fake host: they read facts and change only what differs (copy, template, file,
systemd_service, command), and compute without applying in check mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from runner_helpers import managed, run

from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules.builtin import parse_mode, staged_path
from mesh.hosts.connection import CommandResult
from mesh.testing.fake_connector import FakeFleet, FakeUnit


def one(tmp_path: Path, tasks: str, fleet: FakeFleet, **options: object) -> tuple[str, str]:
    """Run tasks on vm1; the recap status of the last task and the transcript."""
    result = run(tmp_path, "- hosts: all\n  tasks:\n" + tasks, fleet, managed("vm1"), **options)
    return result.result.results[-1][2].status, result.output


def test_copy_puts_only_when_the_checksum_differs(tmp_path: Path) -> None:
    fleet = FakeFleet()
    task = "    - copy: {content: 'abc', dest: /etc/x, mode: '0640', owner: mesh, group: mesh}\n"
    assert one(tmp_path, task, fleet)[0] == "changed"
    written = fleet.host("vm1").files["/etc/x"]
    assert (written.data, written.mode, written.owner, written.group) == (b"abc", 0o640, "mesh", "mesh")
    assert one(tmp_path, task, fleet)[0] == "ok" and fleet.host("vm1").puts == ["/etc/x"]
    written.mode = 0o600
    assert one(tmp_path, task, fleet)[0] == "changed"
    assert fleet.host("vm1").puts == ["/etc/x"] and written.mode == 0o640  # chmod, no second put


def test_copy_from_src_and_keeps_existing_attributes(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "app.conf").write_bytes(b"conf")
    fleet = FakeFleet()
    fleet.host("vm1").write("/etc/app.conf", "old", mode=0o600, owner="app", group="app")
    assert one(tmp_path, "    - copy: {src: app.conf, dest: /etc/}\n", fleet)[0] == "changed"
    written = fleet.host("vm1").files["/etc/app.conf"]
    assert (written.data, written.mode, written.owner) == (b"conf", 0o600, "app")


def test_template_renders_host_vars_strictly(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "app.j2").write_text("host={{ inventory_hostname }} port={{ port }}\n{% if port %}\nyes\n{% endif %}\n")
    fleet = FakeFleet()
    status, _ = one(tmp_path, "    - template: {src: app.j2, dest: /etc/app}\n", fleet,
                    templates_dir=templates, host_vars={"vm1": {"port": 8080}})
    assert status == "changed" and fleet.host("vm1").files["/etc/app"].data == b"host=vm1 port=8080\nyes\n"
    status, out = one(tmp_path, "    - template: {src: app.j2, dest: /etc/app}\n", fleet, templates_dir=templates)
    assert status == "failed" and "'port' is undefined" in out
    status, out = one(tmp_path, "    - template: {src: nope.j2, dest: /etc/app}\n", fleet, templates_dir=templates)
    assert status == "failed" and "nope.j2" in out


def test_file_states(tmp_path: Path) -> None:
    fleet = FakeFleet()
    host = fleet.host("vm1")
    assert one(tmp_path, "    - file: {path: /d, state: directory, mode: '0750', owner: a}\n", fleet)[0] == "changed"
    assert (host.files["/d"].data, host.files["/d"].mode, host.files["/d"].owner) == (None, 0o750, "a")
    assert one(tmp_path, "    - file: {path: /d, state: directory, mode: '0750', owner: a}\n", fleet)[0] == "ok"
    host.write("/d/f", "x")
    assert one(tmp_path, "    - file: {path: /d, state: absent}\n", fleet)[0] == "changed"
    assert host.files == {}
    assert one(tmp_path, "    - file: {path: /d, state: absent}\n", fleet)[0] == "ok"
    assert one(tmp_path, "    - file: {path: /t, state: touch}\n", fleet)[0] == "changed"
    status, out = one(tmp_path, "    - file: {path: /missing}\n", fleet)
    assert status == "failed" and "does not exist" in out
    host.write("/plain", "x")
    status, out = one(tmp_path, "    - file: {path: /plain, state: directory}\n", fleet)
    assert status == "failed" and "not a directory" in out


def test_systemd_service_changes_only_what_differs(tmp_path: Path) -> None:
    fleet = FakeFleet()
    host = fleet.host("vm1")
    host.units["app.service"] = FakeUnit()
    task = "    - systemd_service: {name: app.service, state: started, enabled: true, daemon_reload: true}\n"
    assert one(tmp_path, task, fleet)[0] == "changed"
    assert host.changing_commands() == ["systemctl daemon-reload", "systemctl enable app.service",
                                        "systemctl start app.service"]
    host.commands.clear()
    assert one(tmp_path, task, fleet)[0] == "ok"  # daemon-reload alone is not a change
    assert one(tmp_path, "    - systemd: {name: app.service, state: stopped}\n", fleet)[0] == "changed"
    assert host.units["app.service"].active == "inactive"
    assert one(tmp_path, "    - systemd_service: {name: app.service, state: restarted}\n", fleet)[0] == "changed"
    status, out = one(tmp_path, "    - systemd_service: {name: nope.service, state: started}\n", fleet)
    assert status == "failed" and "nope.service" in out


def test_command_creates_removes_and_failures(tmp_path: Path) -> None:
    fleet = FakeFleet()
    host = fleet.host("vm1")
    host.stub(r"^cd /srv && echo 'a b'$", CommandResult(0, b"a b\n", b""))
    host.stub(r"^exit-3", CommandResult(3, b"", b"bad"))
    assert one(tmp_path, "    - command: {argv: [echo, a b], chdir: /srv}\n", fleet)[0] == "changed"
    host.write("/done", "")
    assert one(tmp_path, "    - command: {cmd: rm -rf /, creates: /done}\n", fleet)[0] == "ok"
    assert one(tmp_path, "    - command: {cmd: rm -rf /, removes: /absent}\n", fleet)[0] == "ok"
    assert "rm -rf /" not in host.commands
    status, out = one(tmp_path, "    - command: exit-3\n", fleet)
    assert status == "failed" and '"rc": 3' in out and "non-zero return code" in out


def test_check_mode_runs_no_command(tmp_path: Path) -> None:
    fleet = FakeFleet()
    status, _ = one(tmp_path, "    - command: touch /x\n    - copy: {content: x, dest: /y}\n", fleet, check=True)
    assert status == "changed" and fleet.host("vm1").changing_commands() == []
    assert fleet.host("vm1").files == {}


def test_parse_mode() -> None:
    assert parse_mode("0640") == 0o640 and parse_mode(0o755) == 0o755 and parse_mode(None) is None
    with pytest.raises(ModuleFailure):
        parse_mode("u=rw")


def test_copy_with_validate_checks_a_staged_file_before_it_replaces_the_old_one(tmp_path: Path) -> None:
    """Ansible's `validate`: %s is the new file staged beside dest; a refusal leaves dest as it was."""
    fleet = FakeFleet()
    host = fleet.host("vm1")
    host.write("/etc/nft.conf", "old rules")
    staged = staged_path("/etc/nft.conf")
    assert staged == "/etc/.mesh-staged/nft.conf"

    def move(cmd: str, stdin: bytes | None) -> CommandResult:
        source, dest = cmd.split()[-2:]
        host.files[dest] = host.files.pop(source)
        return CommandResult(0, b"", b"")

    host.stub(r"^mv -f -- ", move)
    host.stub(r"^nft -c -f ", lambda cmd, _: CommandResult(1, b"", b"nft.conf:1:1-3: Error: syntax error, unexpected bad")
              if host.files[cmd.split()[-1]].data == b"bad" else CommandResult(0, b"", b""))
    task = "    - copy: {content: '%s', dest: /etc/nft.conf, validate: 'nft -c -f %%s'}\n"
    status, out = one(tmp_path, task % "bad", fleet)
    assert status == "failed" and "failed to validate /etc/nft.conf (it is left as it was)" in out
    assert "syntax error, unexpected bad" in out
    assert host.files["/etc/nft.conf"].data == b"old rules" and staged not in host.files
    assert f"nft -c -f {staged}" in host.commands
    status, _ = one(tmp_path, task % "good", fleet)
    assert status == "changed" and host.files["/etc/nft.conf"].data == b"good" and staged not in host.files
    assert host.puts == [staged, staged]  # never written over dest directly
    status, out = one(tmp_path, "    - copy: {content: x, dest: /etc/nft.conf, validate: 'nft -c -f'}\n", fleet)
    assert status == "failed" and "validate must contain %s" in out
