"""Who reaches a proxy's metrics port: on VMs mesh's nft table (accept from Mesh.metrics_sources, drop from
everyone else), on container hosts the rules script (DNAT like proxy_port, the forward chain and the app
namespace's chain). Golden files in tests/golden/metrics (input: its inventory.yaml), the real `nft -c` and
`iptables-restore --test` where they decide, and the script run against fake docker, nsenter, iptables, getent.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_containers import FakeDocker, FakeRulesHost, PlanEntries

from mesh.config import paths
from mesh.config.errors import ConfigError
from mesh.containers.modules import sidecar_host
from mesh.containers.reachability import RULES_PATH, WATCHER_UNIT, UnsafeScript, render_rules
from mesh.deploy.execute import apply_change
from mesh.deploy.modules.api import TaskContext
from mesh.hosts.connection import CommandResult
from mesh.inventory.loader import load_inventory
from mesh.inventory.model import Mesh
from mesh.inventory.validate import build_mesh
from mesh.plan.build import PlanInputs, build_plan
from mesh.render import render_firewall
from mesh.testing.fake_connector import FakeConnector, FakeHost, FakeUnit

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "metrics"
INVENTORY = GOLDEN / "inventory.yaml"
SOURCES = ("10.0.0.50", "fd00::50", "graf.golden.internal", "10.0.0.3")
HOSTILE_SOURCES = ["10.0.0.50 } accept; flush ruleset", "10.0.0.50\nreboot", "prom'$(reboot)'", "a,b", "fe80::1%eth0",
                   "10.0.0.0/0", "", "prom_1"]


def golden_mesh() -> Mesh:
    return build_mesh(load_inventory(str(INVENTORY)), str(INVENTORY))


def check_golden(path: Path, text: str, update: bool) -> None:
    if update:
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run pytest --update-goldens"
    assert text == path.read_text(), f"{path} differs: run pytest --update-goldens and review the diff"


def test_the_golden_mesh_names_a_source_of_every_kind() -> None:
    assert golden_mesh().metrics_sources == SOURCES


# --- VMs: nftables -----------------------------------------------------------------------------------------------

def test_firewall_golden(update_goldens: bool) -> None:
    mesh = golden_mesh()
    check_golden(GOLDEN / "vm1.nft", render_firewall(mesh.host("vm1"), mesh.metrics_sources), update_goldens)


def _rules(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("\t\t") and not line.strip().startswith("#")]


def test_metrics_ports_accept_the_sources_by_family_then_drop_everyone_else_after_loopback() -> None:
    mesh = golden_mesh()
    assert _rules(render_firewall(mesh.host("vm1"), mesh.metrics_sources))[1:] == [
        'iif "lo" accept',
        "tcp dport { 20000, 29090 } ip saddr { 10.0.0.50, 10.0.0.3 } accept",
        "tcp dport { 20000, 29090 } ip6 saddr { fd00::50 } accept",
        "tcp dport { 20000, 29090 } ip saddr { graf.golden.internal } accept",
        "tcp dport { 20000, 29090 } drop",
        "tcp dport { 8080, 9090 } drop",
    ]


def test_with_no_source_the_metrics_ports_answer_loopback_only() -> None:
    assert _rules(render_firewall(golden_mesh().host("vm1"), ()))[1:] == [
        'iif "lo" accept', "tcp dport { 20000, 29090 } drop", "tcp dport { 8080, 9090 } drop"]


@pytest.mark.parametrize("source", HOSTILE_SOURCES)
def test_firewall_refuses_a_source_that_is_not_an_address(source: str) -> None:
    with pytest.raises(ConfigError, match="metrics source"):
        render_firewall(golden_mesh().host("vm1"), ("10.0.0.3", source))


def _nft_check(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "firewall.nft"
    script.write_text(text)
    return subprocess.run(["nft", "-c", "-f", str(script)], capture_output=True, text=True, check=False, timeout=30)


def test_the_table_loads_with_the_real_nft(tmp_path: Path) -> None:
    """nft itself parses the table, the sets of each family and a host name it resolves (localhost here)."""
    text = render_firewall(golden_mesh().host("vm1"), ("10.0.0.50", "fd00::50", "::1", "localhost", "10.0.0.3"))
    checked = _nft_check(text, tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_a_host_name_nft_cannot_resolve_fails_the_check_the_deploy_runs(tmp_path: Path) -> None:
    """The deploy runs `nft -c -f` on the host before it replaces the table: a scraper name that does not resolve
    there is refused, and the table in place stays."""
    checked = _nft_check(render_firewall(golden_mesh().host("vm1"), ("nothing.invalid",)), tmp_path)
    assert checked.returncode != 0 and "Could not resolve hostname" in checked.stderr


# --- container hosts: the rules script ---------------------------------------------------------------------------

def test_rules_golden(update_goldens: bool) -> None:
    mesh = golden_mesh()
    check_golden(GOLDEN / "dock1-sidecar-rules.sh", render_rules(mesh.host("dock1"), mesh.metrics_sources),
                 update_goldens)


def test_rules_carry_each_family_and_the_metrics_ports_of_each_app() -> None:
    text = render_rules(golden_mesh().host("dock1"), SOURCES)
    assert "SOURCES_V4='10.0.0.50 10.0.0.3'\nSOURCES_V6='fd00::50'\nSOURCE_NAMES='graf.golden.internal'\n" in text
    assert "ENTRIES='api-1 21000 20000\napi-1 21001 20001\n'" in text
    assert "APP_PORTS='api-1 5432,9090 20000,20001\n'" in text


@pytest.mark.parametrize("source", HOSTILE_SOURCES)
def test_rules_refuse_a_source_that_is_not_an_address(source: str) -> None:
    with pytest.raises(UnsafeScript, match="metrics source"):
        render_rules(golden_mesh().host("dock1"), ("10.0.0.3", source))


def _body(script: str, bin_dir: Path) -> str:
    """The script's functions with PATH through bin_dir, without its lock and verb (the caller adds a command)."""
    return script.replace("PATH=/usr/local/sbin", f"PATH={bin_dir}:/usr/local/sbin").split(
        "\n# The watcher and a deploy")[0]


def _fake_bin(tmp_path: Path, getent: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text('#!/bin/sh\n[ "$5" = api-1 ] && echo "172.18.0.5 " || exit 1\n')
    (bin_dir / "getent").write_text(f"#!/bin/sh\n{getent}\n")
    for name in ("docker", "getent"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


GETENT = ('[ "$1" = ahostsv4 ] && [ "$2" = graf.golden.internal ] || exit 2\n'
          'printf "10.0.0.60       STREAM graf.golden.internal\\n10.0.0.60       DGRAM\\n"\n'
          'printf "10.0.0.61       STREAM\\n"')


def test_the_forward_chain_accepts_each_source_address_and_drops_the_rest(tmp_path: Path) -> None:
    script = render_rules(golden_mesh().host("dock1"), SOURCES)
    done = subprocess.run(["sh", "-c", _body(script, _fake_bin(tmp_path, GETENT)) + "\ndesired\n"],
                          capture_output=True, text=True, check=False, timeout=30)
    assert done.returncode == 0, done.stderr
    fwd = [line for line in done.stdout.splitlines() if line.startswith("-A MESH-SIDECARS-FWD")]
    accept = "-d 172.18.0.5/32 -p tcp -m tcp --dport {} -m conntrack --ctstate DNAT -j ACCEPT"
    assert fwd == [
        f"-A MESH-SIDECARS-FWD {accept.format(21000)}",
        *(f"-A MESH-SIDECARS-FWD -s {source}/32 {accept.format(20000)}"
          for source in ("10.0.0.50", "10.0.0.3", "10.0.0.60", "10.0.0.61")),
        "-A MESH-SIDECARS-FWD -d 172.18.0.5/32 -p tcp -m tcp --dport 20000 -j DROP",
        f"-A MESH-SIDECARS-FWD {accept.format(21001)}",
        *(f"-A MESH-SIDECARS-FWD -s {source}/32 {accept.format(20001)}"
          for source in ("10.0.0.50", "10.0.0.3", "10.0.0.60", "10.0.0.61")),
        "-A MESH-SIDECARS-FWD -d 172.18.0.5/32 -p tcp -m tcp --dport 20001 -j DROP",
    ]
    assert "-A MESH-SIDECARS -p tcp -m tcp --dport 20001 -j DNAT --to-destination 172.18.0.5:20001" in done.stdout


def test_a_name_that_does_not_resolve_allows_nothing_and_says_so(tmp_path: Path) -> None:
    script = render_rules(golden_mesh().host("dock1"), ("graf.golden.internal",))
    done = subprocess.run(["sh", "-c", _body(script, _fake_bin(tmp_path, "exit 2")) + "\ndesired\n"],
                          capture_output=True, text=True, check=False, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "metrics source graf.golden.internal does not resolve: it is not allowed" in done.stderr
    assert " -s " not in done.stdout and "--dport 20000 -j DROP" in done.stdout


@pytest.mark.needs_root(reason="iptables-restore --test needs CAP_NET_ADMIN")
def test_every_rule_the_script_computes_passes_iptables_restore_test(tmp_path: Path) -> None:
    script = render_rules(golden_mesh().host("dock1"), SOURCES)
    body = _body(script, _fake_bin(tmp_path, GETENT))
    for tool, command in (("iptables", "desired"), ("iptables", "app_rules iptables 5432,9090 20000,20001"),
                          ("ip6tables", "app_rules ip6tables 5432,9090 20000,20001")):
        rules = subprocess.run(["sh", "-c", f"{body}\n{command}\n"], capture_output=True, text=True, check=True,
                               timeout=30).stdout
        assert "-j" in rules
        tested = subprocess.run([f"{tool}-restore", "--test", "-w", "--noflush"], input=rules, capture_output=True,
                                text=True, check=False, timeout=30)
        assert tested.returncode == 0, f"{tool}-restore refused:\n{rules}\n{tested.stderr}"


class NamedSourcesHost(FakeRulesHost):
    """The fake container host of test_containers, with a fake getent whose answer the test changes."""

    def __init__(self, folder: Path, running: dict[str, int]) -> None:
        super().__init__(folder, running, ("10.0.0.3", "fd00::9", "prom.test"))
        self.resolve("10.0.0.70")

    def resolve(self, *addresses: str) -> None:
        lines = "".join(f"printf '%s\\n' '{address}       STREAM prom.test'\n" for address in addresses)
        getent = self.folder / "bin" / "getent"
        getent.write_text(f'#!/bin/sh\n[ "$1 $2" = "ahostsv4 prom.test" ] || exit 2\n{lines}')
        getent.chmod(0o755)


def test_the_app_namespace_returns_loopback_and_the_sources_to_the_metrics_port(tmp_path: Path) -> None:
    fake = NamedSourcesHost(tmp_path, {"api-v2-1": 501})
    assert fake.run("apply").returncode == 0
    assert fake.rules(501)["filter/MESH-APP"] == [
        "-A MESH-APP -i lo -j RETURN",
        "-A MESH-APP -s 10.0.0.3 -p tcp -m tcp --dport 20000 -j RETURN",
        "-A MESH-APP -s 10.0.0.70 -p tcp -m tcp --dport 20000 -j RETURN",
        "-A MESH-APP -p tcp -m tcp --dport 20000 -j DROP",
        "-A MESH-APP -p tcp -m tcp --dport 9090 -j DROP",
    ]
    assert fake.rules(501, "ip6tables")["filter/MESH-APP"] == [
        "-A MESH-APP -i lo -j RETURN",
        "-A MESH-APP -s fd00::9 -p tcp -m tcp --dport 20000 -j RETURN",
        "-A MESH-APP -p tcp -m tcp --dport 20000 -j DROP",
        "-A MESH-APP -p tcp -m tcp --dport 9090 -j DROP",
    ]
    assert fake.run("check").returncode == 0


def test_check_sees_a_source_name_that_now_resolves_elsewhere(tmp_path: Path) -> None:
    fake = NamedSourcesHost(tmp_path, {"api-v2-1": 501})
    assert fake.run("apply").returncode == 0 and fake.run("check").returncode == 0
    fake.resolve("10.0.0.71", "10.0.0.72")
    assert fake.run("check").returncode == 1
    assert fake.run("apply").returncode == 0 and fake.run("check").returncode == 0
    allowed = [rule for rule in fake.rules(501)["filter/MESH-APP"] if " -s " in rule]
    assert [re.search(r"-s (\S+)", rule)[1] for rule in allowed] == ["10.0.0.3", "10.0.0.71", "10.0.0.72"]  # type: ignore[index]


# --- the plan and the deploy's module ----------------------------------------------------------------------------

def _plan() -> PlanEntries:
    return PlanEntries(build_plan(golden_mesh(), PlanInputs(b"the root certificate", "00:11",
                                                            sidecar_image="mesh-envoy:0123456789ab")))


def test_the_plan_gives_every_host_the_mesh_sources() -> None:
    plan = _plan().plan
    firewall = plan.host("vm1").file(paths.FIREWALL_PATH).content.decode()
    assert "ip6 saddr { fd00::50 } accept" in firewall and "ip saddr { 10.0.0.50, 10.0.0.3 } accept" in firewall
    rules = plan.host("dock1").file(RULES_PATH).content.decode()
    assert "SOURCES_V4='10.0.0.50 10.0.0.3'" in rules and "SOURCE_NAMES='graf.golden.internal'" in rules


def _sidecar_host_writes(shared: PlanEntries | None) -> bytes | None:
    """What mesh.sidecar_host writes at RULES_PATH on a fake dock1, given the deploy's shared object."""
    host = FakeHost("dock1")
    FakeDocker(host)
    host.stub(rf"^{RULES_PATH} ", CommandResult(0, b"", b""))
    host.units[WATCHER_UNIT] = FakeUnit()
    connector = FakeConnector(host)
    ctx: TaskContext[Any] = TaskContext(golden_mesh().host("dock1"), connector, {}, False, shared, Path("."),
                                        Path("."))
    steps = sidecar_host(ctx, {})
    try:
        change = next(steps)
        while True:
            change = steps.send(apply_change(change, connector))
    except StopIteration:
        pass
    return host.files[RULES_PATH].data


def test_the_deploy_writes_the_plans_rules_script_and_a_playbook_of_its_own_allows_no_one() -> None:
    entries = _plan()
    assert _sidecar_host_writes(entries) == entries.plan.host("dock1").file(RULES_PATH).content
    assert b"SOURCES_V4='10.0.0.50 10.0.0.3'" in entries.plan.host("dock1").file(RULES_PATH).content
    assert _sidecar_host_writes(None) == render_rules(golden_mesh().host("dock1"), ()).encode()


def test_a_plan_with_a_bad_source_is_refused_before_any_host() -> None:
    mesh = replace(golden_mesh(), metrics_scrapers=("10.0.0.50;reboot",))
    with pytest.raises((ConfigError, UnsafeScript)):
        build_plan(mesh, PlanInputs(b"the root certificate", "00:11", sidecar_image="mesh-envoy:0123456789ab"))
