"""Every value that reaches a host, with every hostile payload, in a YAML inventory and in an INI one (values
in group_vars/ and host_vars/ YAML files, host names on the INI line). Each case is one inventory with one
hostile value; expect says where mesh must point.

`cases()` is what tests/test_inventory_hostile.py reads; `python generate.py DIR` writes the cases into DIR.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

# name -> (text in a YAML double-quoted string, text on an INI line or None when INI cannot hold it)
PAYLOADS: dict[str, tuple[str, str | None]] = {
    "newline": ("\\ntouch /root/x\\n#", None),
    "cr": ("\\rConflicts=sshd.service\\r#", None),
    "nul": ("\\0", None),
    "single-quote": ("'; reboot; '", None),
    "double-quote": ('\\"; reboot; \\"', None),
    "command-substitution": ("$(reboot)", "$(reboot)"),
    "backticks": ("`reboot`", "`reboot`"),
    "dot-dot-slash": ("/../../etc", "/../../etc"),
    "u2028": ("\\u2028x", None),
    "u2029": ("\\u2029x", None),
    "u0085": ("\\u0085x", None),
}

# slot -> (key mesh names, words of the message, good value)
SLOTS: dict[str, tuple[str, str, str]] = {
    "host": ("host", "letters, digits", "vm1"),
    "service": ("mesh_workloads[0].service", "DNS label", "web"),
    "version": ("mesh_workloads[0].version", "version label", "v1"),
    "container": ("mesh_workloads[0].container", "container name", "api-v2-1"),
    "trust_domain": ("mesh_trust_domain", "trust domain", "lab.mesh"),
    "health_path": ("mesh_workloads[0].health.http", "HTTP path", "/healthz"),
    "ansible_host": ("ansible_host", "host name or IP address", "192.0.2.11"),
    "ansible_user": ("ansible_user", "user name", "deploy"),
    "port": ("mesh_workloads[0].port", "a port", "8080"),
    "local_port": ("mesh_workloads[0].upstreams[0].local_port", "a port", "19101"),
    "upstream": ("mesh_workloads[0].upstreams[0].service", "DNS label", "api"),
    "consul_url": ("mesh_consul_url", "URL", "http://192.0.2.2:8500"),
}

YAML = """all:
  vars:
    mesh_consul_url: "{consul_url}"
    mesh_trust_domain: "{trust_domain}"
  children:
    mesh_controllers:
      hosts:
        ctl1: {{ansible_host: 192.0.2.3}}
    vms:
      hosts:
        "{host}":
          ansible_host: "{ansible_host}"
          ansible_user: "{ansible_user}"
          mesh_workloads:
            - service: "{service}"
              version: "{version}"
              port: "{port}"
              health: {{http: "{health_path}"}}
              upstreams: [{{service: "{upstream}", local_port: "{local_port}"}}]
            - {{service: api, port: 9090}}
    containers:
      vars: {{mesh_host_kind: container_host}}
      hosts:
        dock1:
          ansible_host: 192.0.2.20
          mesh_workloads:
            - {{service: api, version: v2, port: 9090, container: "{container}"}}
"""

INI = """[mesh_controllers]
ctl1 ansible_host=192.0.2.3

[vms]
{host} ansible_user={ansible_user}

[containers]
dock1 ansible_host=192.0.2.20

[containers:vars]
mesh_host_kind=container_host
"""
INI_ALL = """mesh_consul_url: "{consul_url}"
mesh_trust_domain: "{trust_domain}"
"""
INI_VMS = """ansible_host: "{ansible_host}"
mesh_workloads:
  - service: "{service}"
    version: "{version}"
    port: "{port}"
    health: {{http: "{health_path}"}}
    upstreams: [{{service: "{upstream}", local_port: "{local_port}"}}]
  - {{service: api, port: 9090}}
"""
INI_DOCK = """mesh_workloads:
  - {{service: api, version: v2, port: 9090, container: "{container}"}}
"""
# Where each slot is written in the INI layout (the others are in hosts.ini).
INI_FILES = {"hosts.ini": INI, "group_vars/all.yml": INI_ALL, "group_vars/vms.yml": INI_VMS,
             "host_vars/dock1.yml": INI_DOCK}
INI_LINE_SLOTS = ("host", "ansible_user")


@dataclass(frozen=True)
class Case:
    files: dict[str, str]
    expect: dict[str, object] = field(default_factory=dict)


def _line_of(template: str, slot: str) -> int:
    marker = "{" + slot + "}"
    return next(number for number, line in enumerate(template.splitlines(), 1) if marker in line)


def _hostile(slot: str, payload: str) -> str:
    good = SLOTS[slot][2]
    if slot == "health_path" and payload.startswith("/"):
        return good + payload  # /healthz/../../etc: a path, but with '..' segments
    if slot in ("port", "local_port") and payload.startswith("/"):
        return ".." + payload + good
    return good + payload


def _values(slot: str, text: str) -> dict[str, str]:
    values = {name: good for name, (_, _, good) in SLOTS.items()}
    values[slot] = text
    return values


def _expect(slot: str, file: str, line: int) -> dict[str, object]:
    key, words, _ = SLOTS[slot]
    return {"file": file, "line": line, "key": key, "text": words}


def yaml_case(slot: str, payload: str) -> Case:
    values = _values(slot, _hostile(slot, PAYLOADS[payload][0]))
    return Case({"hosts.yaml": YAML.format(**values)}, _expect(slot, "hosts.yaml", _line_of(YAML, slot)))


def ini_case(slot: str, payload: str) -> Case | None:
    yaml_text, ini_text = PAYLOADS[payload]
    if slot in INI_LINE_SLOTS:
        if ini_text is None:
            return None  # an INI line cannot hold it (a line break, a quote shlex would eat)
        values = _values(slot, SLOTS[slot][2] + ini_text)
    else:
        values = _values(slot, _hostile(slot, yaml_text))
    values["host"] = values["host"] if slot == "host" else "vm1"
    files = {path: template.format(**values) for path, template in INI_FILES.items()}
    path = next(path for path, template in INI_FILES.items() if "{" + slot + "}" in template)
    return Case(files, _expect(slot, path, _line_of(INI_FILES[path], slot)))


def cases() -> dict[str, Case]:
    found: dict[str, Case] = {}
    for slot in SLOTS:
        for payload in PAYLOADS:
            found[f"yaml-{slot}-{payload}"] = yaml_case(slot, payload)
            ini = ini_case(slot, payload)
            if ini is not None:
                found[f"ini-{slot}-{payload}"] = ini
    return found


def write(root: str) -> None:
    for name, case in cases().items():
        for path, text in case.files.items():
            target = os.path.join(root, name, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
        with open(os.path.join(root, name, "expect.yaml"), "w", encoding="utf-8") as handle:
            handle.write(json.dumps(case.expect) + "\n")


if __name__ == "__main__":
    write(sys.argv[1])
