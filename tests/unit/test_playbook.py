"""Reading playbooks: Ansible's syntax, module names (FQCN and short), keywords, and errors with places."""

from __future__ import annotations

from pathlib import Path

import pytest
from runner_helpers import write_playbook

from mesh.deploy.modules import registry
from mesh.deploy.modules.api import ModuleRun, Outcome, TaskContext
from mesh.deploy.patterns import match_hosts
from mesh.deploy.playbook import load_playbook
from mesh.errors import EXIT_PARSE_ERROR, InventoryError, InventoryErrors


def test_reads_plays_tasks_and_keywords(tmp_path: Path) -> None:
    path = write_playbook(tmp_path, """
        - name: base
          hosts: vms:&web:!vm3
          gather_facts: false
          become: true
          vars: {port: 80}
          tasks:
            - name: motd
              ansible.builtin.copy: {content: hi, dest: /etc/motd, mode: "0644"}
              when: [port == 80, "'vm' in inventory_hostname"]
              notify: restart
              tags: [files]
              register: motd
              become: yes
            - file: path=/etc/mesh state=directory mode=0755
            - command: systemctl is-active sshd
              changed_when: false
            - name: dirs
              file: {path: "/etc/{{ item }}", state: directory}
              loop: [a, b]
          handlers:
            - name: restart
              listen: [restart things]
              systemd_service: {name: x, state: restarted}
    """)
    play = load_playbook(path).plays[0]
    assert (play.name, play.hosts, dict(play.vars)) == ("base", "vms:&web:!vm3", {"port": 80})
    motd, directory, check, dirs = play.tasks
    assert motd.module == "copy" and motd.args["dest"] == "/etc/motd"
    assert motd.when == ("port == 80", "'vm' in inventory_hostname")
    assert (motd.notify, motd.tags, motd.register) == (("restart",), frozenset({"files"}), "motd")
    assert dict(directory.args) == {"path": "/etc/mesh", "state": "directory", "mode": "0755"}
    assert directory.name == "file"
    assert check.args["cmd"] == "systemctl is-active sshd" and check.changed_when == (False,)
    assert dirs.loop == ["a", "b"]
    assert play.handlers[0].listen == ("restart things",)
    assert motd.origin.line == 8


def errors_of(tmp_path: Path, text: str) -> list[InventoryError]:
    with pytest.raises(InventoryErrors) as caught:
        load_playbook(write_playbook(tmp_path, text))
    assert caught.value.exit_code == EXIT_PARSE_ERROR
    return caught.value.errors


def test_unknown_module_has_a_place_and_a_suggestion(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, """
        - hosts: all
          tasks:
            - name: x
              ansible.builtin.cpy: {dest: /x, content: y}
    """)
    assert error.origin.line == 5 and error.key == "play[0].tasks[0].ansible.builtin.cpy"
    assert "did you mean" in str(error.hint) and "copy" in str(error.hint)


def test_unknown_task_key_and_argument(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, """
        - hosts: all
          tasks:
            - copy: {dset: /x, content: y}
              notfy: restart
    """)
    messages = {error.key: str(error) for error in errors}
    assert "'notify'" in messages["play[0].tasks[0].notfy"]
    assert "'dest'" in messages["play[0].tasks[0].copy.dset"]
    lines = {error.key: error.origin.line for error in errors}
    assert lines == {"play[0].tasks[0].copy.dset": 4, "play[0].tasks[0].notfy": 5}


def test_play_level_errors(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, """
        - name: no hosts
          taks: []
        - hosts: all
          tasks:
            - block: []
            - name: nothing
    """)
    text = "\n".join(str(error) for error in errors)
    assert "did you mean 'tasks'" in text
    assert "needs `hosts:`" in text
    assert "blocks are not supported" in text
    assert "names no module" in text


def test_not_a_list_and_yaml_errors(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, "hosts: all\n")
    assert "list of plays" in str(error)
    with pytest.raises(InventoryError) as caught:
        load_playbook(write_playbook(tmp_path, "- hosts: all\n  tasks: [\n"))
    assert caught.value.exit_code == EXIT_PARSE_ERROR and "play.yml:" in str(caught.value)


def _noop(ctx: TaskContext[None], args: dict[str, object]) -> ModuleRun:
    return Outcome(msg="nothing")
    yield  # a generator


def test_mesh_modules_registered_by_others(tmp_path: Path) -> None:
    modules = registry.copy()
    modules.register("mesh.certificate", _noop, params={"proxy"})
    path = write_playbook(tmp_path, """
        - hosts: all
          tasks:
            - mesh.certificate: {proxy: web-0}
    """)
    assert load_playbook(path, modules).plays[0].tasks[0].module == "mesh.certificate"
    assert registry.resolve("mesh.certificate") is None  # the shared registry is untouched
    with pytest.raises(InventoryErrors):
        load_playbook(path)


def test_host_patterns() -> None:
    hosts = ["vm1", "vm2", "vm3", "ctl1"]
    groups = {"vms": ["vm1", "vm2", "vm3"], "web": ["vm1", "vm3"], "mesh_controllers": ["ctl1"]}
    assert match_hosts("all", hosts, groups) == (hosts, [])
    assert match_hosts("vms:&web", hosts, groups)[0] == ["vm1", "vm3"]
    assert match_hosts("vms:!web", hosts, groups)[0] == ["vm2"]
    assert match_hosts("mesh_controllers:vm2", hosts, groups)[0] == ["vm2", "ctl1"]
    assert match_hosts("vm*,ctl1", hosts, groups)[0] == hosts
    assert match_hosts("nope:vm1", hosts, groups) == (["vm1"], ["nope"])
