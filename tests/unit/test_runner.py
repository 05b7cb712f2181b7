"""The runner on fake hosts: counting, when/loop/register, handlers, check mode, failure isolation,
unreachable hosts, the recap's text and exit codes, and modules registered from outside."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner_helpers import managed, run

from mesh.deploy.modules import registry
from mesh.deploy.modules.api import ModuleRun, Outcome, PutFile, RunCommand, TaskContext
from mesh.deploy.recap import exit_code, format_recap
from mesh.deploy.results import HostStats, PlayResult
from mesh.hosts.connection import CommandResult
from mesh.testing.fake_connector import FakeFleet, FakeUnit

FILES = """
- name: files
  hosts: all
  vars:
    motd: "hello {{ inventory_hostname }}"
  tasks:
    - name: motd
      ansible.builtin.copy: {content: "{{ motd }}\\n", dest: /etc/motd, mode: "0640"}
      notify: restart app
    - name: mesh dir
      file: {path: /etc/mesh, state: directory, mode: "0755"}
    - name: app
      systemd_service: {name: app.service, state: started, enabled: true}
  handlers:
    - name: restart app
      systemd_service: {name: app.service, state: restarted}
"""


def fleet_with_app(*names: str) -> FakeFleet:
    fleet = FakeFleet()
    for name in names:
        fleet.host(name).units["app.service"] = FakeUnit()
    return fleet


def test_first_run_changes_second_run_changes_nothing(tmp_path: Path) -> None:
    fleet = fleet_with_app("vm1", "vm2")
    first = run(tmp_path, FILES, fleet)
    assert first.counts("vm1") == {"ok": 4, "changed": 4, "unreachable": 0, "failed": 0, "skipped": 0,
                                   "ignored": 0}
    assert fleet.host("vm1").files["/etc/motd"].data == b"hello vm1\n"
    assert fleet.host("vm1").files["/etc/motd"].mode == 0o640
    assert "RUNNING HANDLER [restart app]" in first.output and first.code == 0
    fleet.host("vm1").commands.clear()
    second = run(tmp_path, FILES, fleet)
    assert second.counts("vm2")["changed"] == 0 and second.counts("vm2")["ok"] == 3
    assert "RUNNING HANDLER" not in second.output
    assert fleet.host("vm1").changing_commands() == []


def test_transcript_reads_like_ansible_playbook(tmp_path: Path) -> None:
    out = run(tmp_path, FILES, fleet_with_app("vm1", "vm2")).output
    assert out.startswith("\nPLAY [files] " + "*" * (80 - len("PLAY [files]")) + "\n")
    assert "\nTASK [motd] ***" in out and "changed: [vm1]\n" in out and "changed: [vm2]\n" in out
    assert out.endswith("ignored=0   \n\n")
    assert "vm1                        : ok=4    changed=4    unreachable=0    failed=0    skipped=0    " \
           "rescued=0    ignored=0   " in out


def test_handler_runs_once_and_only_for_hosts_that_changed(tmp_path: Path) -> None:
    fleet = fleet_with_app("vm1", "vm2")
    fleet.host("vm2").write("/etc/motd", "hello vm2\n", mode=0o640)
    fleet.host("vm2").write("/etc/flag", "x")
    result = run(tmp_path, """
        - hosts: all
          tasks:
            - copy: {content: "hello {{ inventory_hostname }}\\n", dest: /etc/motd, mode: "0640"}
              notify: [restart app, ping]
            - copy: {content: "y", dest: /etc/other}
              notify: restart app
          handlers:
            - name: restart app
              systemd_service: {name: app.service, state: restarted}
            - name: pong
              listen: ping
              command: echo pong
    """, fleet)
    restarts = [c for name in ("vm1", "vm2") for c in fleet.host(name).commands if "restart" in c]
    assert restarts == ["systemctl restart app.service", "systemctl restart app.service"]
    assert fleet.host("vm2").commands.count("echo pong") == 0
    assert fleet.host("vm1").commands.count("echo pong") == 1
    assert result.output.count("RUNNING HANDLER [restart app]") == 1


def test_failure_stops_only_that_host(tmp_path: Path) -> None:
    fleet = fleet_with_app("vm1", "vm2")
    fleet.host("vm2").stub("systemctl start", CommandResult(1, b"", b"Job failed"))
    result = run(tmp_path, FILES + """
- name: second play
  hosts: all
  tasks:
    - copy: {content: "x", dest: /etc/after}
""", fleet)
    assert result.counts("vm2")["failed"] == 1 and result.counts("vm1")["failed"] == 0
    assert "fatal: [vm2]: FAILED! => " in result.output and "Job failed" in result.output
    assert "/etc/after" in fleet.host("vm1").files and "/etc/after" not in fleet.host("vm2").files
    assert "systemctl restart app.service" not in fleet.host("vm2").commands  # its handler never runs
    assert "systemctl restart app.service" in fleet.host("vm1").commands
    assert result.code == 2


def test_unreachable_host_is_out_and_exit_3_wins(tmp_path: Path) -> None:
    fleet = fleet_with_app("vm1", "vm2", "vm3")
    fleet.host("vm2").unreachable = "host key of 10.0.0.2 CHANGED"
    fleet.host("vm3").stub("systemctl start", CommandResult(1, b"", b"no"))
    result = run(tmp_path, FILES, fleet, managed("vm1", "vm2", "vm3"))
    assert result.counts("vm2") == {"ok": 0, "changed": 0, "unreachable": 1, "failed": 0, "skipped": 0,
                                    "ignored": 0}
    assert 'fatal: [vm2]: UNREACHABLE! => {"changed": false, "msg": "host key of 10.0.0.2 CHANGED"' \
        in result.output
    assert result.output.count("[vm2]") == 1 and result.code == 3
    assert result.counts("vm1")["changed"] == 4


def test_check_mode_computes_without_applying(tmp_path: Path) -> None:
    fleet = fleet_with_app("vm1", "vm2")
    result = run(tmp_path, FILES, fleet, check=True)
    assert result.counts("vm1")["changed"] == 4 and result.result.check_mode
    assert fleet.host("vm1").files == {} and fleet.host("vm1").puts == []
    assert fleet.host("vm1").changing_commands() == []
    assert fleet.host("vm1").units["app.service"].active == "inactive"


def test_when_loop_register_and_conditions(tmp_path: Path) -> None:
    fleet = FakeFleet()
    for name in ("vm1", "vm2"):
        fleet.host(name).stub(r"^cat /etc/role$", CommandResult(0, b"web\n", b""))
        fleet.host(name).stub(r"^false$", CommandResult(1, b"", b"nope"))
    result = run(tmp_path, """
        - hosts: all
          vars: {dirs: [a, b, c], skip: b}
          tasks:
            - command: cat /etc/role
              register: role
              changed_when: false
            - name: dirs
              file: {path: "/srv/{{ item }}", state: directory}
              loop: "{{ dirs }}"
              when: item != skip
            - name: only vm1
              file: {path: /srv/one, state: directory}
              when:
                - inventory_hostname == 'vm1'
                - role.stdout == 'web'
            - name: may fail
              command: "false"
              ignore_errors: true
              register: failing
            - name: after failure
              file: {path: /srv/after, state: directory}
              when: failing is failed and extra == 'yes'
            - name: not a failure
              command: "false"
              failed_when: failing.rc != 1
    """, fleet, extra_vars={"extra": "yes"})
    vm1, vm2 = fleet.host("vm1"), fleet.host("vm2")
    assert {"/srv/a", "/srv/c", "/srv/one", "/srv/after"} <= set(vm1.files) and "/srv/b" not in vm1.files
    assert "/srv/one" not in vm2.files
    assert result.counts("vm2") == {"ok": 5, "changed": 3, "unreachable": 0, "failed": 0, "skipped": 1,
                                    "ignored": 1}
    assert "changed: [vm1] => (item=a)" in result.output and "skipping: [vm1] => (item=b)" in result.output
    assert "...ignoring" in result.output and result.code == 0


def test_expression_errors_fail_the_task(tmp_path: Path) -> None:
    result = run(tmp_path, """
        - hosts: all
          tasks:
            - copy: {content: "{{ missing }}", dest: /x}
    """, FakeFleet())
    assert result.code == 2 and "'missing' is undefined" in result.output


def test_tags_select_tasks(tmp_path: Path) -> None:
    fleet = FakeFleet()
    run(tmp_path, """
        - hosts: all
          tasks:
            - {file: {path: /a, state: directory}, tags: [one]}
            - {file: {path: /b, state: directory}, tags: [two]}
            - {file: {path: /c, state: directory}, tags: [always]}
    """, fleet, tags=["one"])
    assert sorted(fleet.host("vm1").files) == ["/a", "/c"]


def test_patterns_pick_hosts_by_group(tmp_path: Path) -> None:
    fleet = FakeFleet()
    result = run(tmp_path, """
        - hosts: web:&vms:!vm3
          tasks:
            - file: {path: /web, state: directory}
        - hosts: nothing
          tasks:
            - file: {path: /never, state: directory}
    """, fleet, managed("vm1", "vm2", "vm3"), groups={"vms": ["vm1", "vm2", "vm3"], "web": ["vm1", "vm3"]})
    assert "/web" in fleet.host("vm1").files and fleet.host("vm2").files == {}
    assert "vm3" not in fleet.hosts
    assert "Could not match supplied host pattern, ignoring: nothing" in result.output
    assert "skipping: no hosts matched" in result.output


@dataclass(frozen=True)
class FakeCA:
    issuer: str


def certificate(ctx: TaskContext[FakeCA], args: dict[str, Any]) -> ModuleRun:
    path = f"/etc/mesh/{args['proxy']}.pem"
    csr = yield RunCommand(f"make-csr {args['proxy']}", check_exit=False)
    issued = f"{ctx.shared.issuer}:{ctx.vars['inventory_hostname']}:{csr.text() if csr else '-'}"
    if ctx.connector.get(path) != issued.encode():
        yield PutFile(path, issued.encode(), 0o644)
    return Outcome(msg="issued", data={"issuer": ctx.shared.issuer, "check": ctx.check_mode})


def test_mesh_module_gets_context_and_shared_object(tmp_path: Path) -> None:
    modules = registry.copy()
    modules.register("mesh.certificate", certificate, params={"proxy"})
    fleet = FakeFleet()
    fleet.host("vm1").stub("make-csr", CommandResult(0, b"CSR", b""))
    fleet.host("vm2").stub("make-csr", CommandResult(0, b"CSR", b""))
    result = run(tmp_path, """
        - hosts: all
          tasks:
            - mesh.certificate: {proxy: "web-{{ 0 }}"}
              register: cert
            - copy: {content: "{{ cert.issuer }}", dest: /issuer}
    """, fleet, modules=modules, shared=FakeCA("root-ca"))
    assert fleet.host("vm1").files["/etc/mesh/web-0.pem"].data == b"root-ca:vm1:CSR"
    assert fleet.host("vm2").files["/issuer"].data == b"root-ca"
    assert result.code == 0


def test_recap_and_exit_codes() -> None:
    result = PlayResult(stats={"vm2": HostStats(ok=3, changed=1), "ctl1": HostStats(ok=1, failed=1)})
    assert format_recap(result) == (
        "\nPLAY RECAP " + "*" * 70 + "\n"
        "ctl1                       : ok=1    changed=0    unreachable=0    failed=1    skipped=0    "
        "rescued=0    ignored=0   \n"
        "vm2                        : ok=3    changed=1    unreachable=0    failed=0    skipped=0    "
        "rescued=0    ignored=0   \n\n")
    assert exit_code(result) == 2
    assert exit_code(PlayResult(stats={"a": HostStats(ok=1)})) == 0
    result.stats["vm3"] = HostStats(unreachable=1)
    assert exit_code(result) == 3
