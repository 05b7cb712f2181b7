"""How a plan's changes are shown (mesh.plan.report): `no changes` on a converged fleet, per host its changes with
their diffs and one summary line, the JSON change set `mesh plan --json` and `mesh deploy --json` share, and the
saved plan of `mesh plan -o FILE`."""

from __future__ import annotations

import json

from mesh.plan.changes import Change
from mesh.plan.fleet import Observed
from mesh.plan.report import (
    FleetChanges,
    change_set,
    consul_changes,
    json_report,
    saved_plan,
    summary_line,
    text_report,
)

DIFF = "--- a/etc/mesh/firewall.nft\n+++ b/etc/mesh/firewall.nft\n@@ -1 +1 @@\n-old\n+new\n"
CONVERGED = FleetChanges((Observed("vm1"), Observed("vm2")))
CHANGED = FleetChanges((
    Observed("vm1", (Change("vm1", "file", "/etc/mesh/firewall.nft", "update", "content", diff=DIFF),
                     Change("vm1", "proxy", "db-5432", "remove", "it left the inventory", "db-5432"))),
    Observed("vm2"),
    Observed("vm3", unreachable="cannot connect to 10.0.0.13:22: timed out")))


def test_a_converged_fleet_says_no_changes() -> None:
    assert text_report(CONVERGED) == "no changes\n"
    assert CONVERGED.converged_hosts() == ["vm1", "vm2"] and CONVERGED.count == 0
    assert json.loads(json_report(CONVERGED)) == {"changes": [], "summary": "no changes", "unreachable": {}}


def test_changes_per_host_with_diffs_then_the_summary_line() -> None:
    assert text_report(CHANGED) == (
        "vm1: 2 change(s)\n"
        "  update file /etc/mesh/firewall.nft (content)\n"
        "    --- a/etc/mesh/firewall.nft\n    +++ b/etc/mesh/firewall.nft\n    @@ -1 +1 @@\n    -old\n    +new\n"
        "  remove proxy db-5432 (it left the inventory)\n"
        "vm3: UNREACHABLE: cannot connect to 10.0.0.13:22: timed out\n"
        "Plan: 2 change(s) on 1 host(s) (1 removal(s)); 1 host(s) unreachable\n")
    assert "---" not in text_report(CHANGED, diffs=False)  # --check without --diff: the changes only
    assert CHANGED.changed_hosts() == ["vm1"] and CHANGED.converged_hosts() == ["vm2"]


def test_only_unreachable_hosts_are_still_no_changes_but_said() -> None:
    fleet = FleetChanges((Observed("vm1"), Observed("vm3", unreachable="timed out")))
    assert summary_line(fleet) == "no changes; 1 host(s) unreachable"


def test_consul_changes_are_counted_and_listed_by_node() -> None:
    class Ref:
        node, service_id = "vm9", "web-vm9-8080"
    pending = consul_changes([("api-vm2-9090", {"Node": "vm2"})], [Ref()])
    fleet = FleetChanges(CONVERGED.hosts, tuple(pending))
    assert summary_line(fleet) == "Plan: 2 change(s) on 0 host(s) and in Consul (0 removal(s))"
    assert text_report(fleet).splitlines()[:3] == [
        "Consul: 2 change(s)", "  register consul api-vm2-9090 on node vm2",
        "  deregister consul web-vm9-8080 on node vm9"]


def test_the_json_change_set_is_plain_data_in_host_order() -> None:
    data = json.loads(json_report(CHANGED, {"exit_code": 0}))
    assert data["changes"] == change_set(CHANGED) == [
        {"host": "vm1", "kind": "file", "subject": "/etc/mesh/firewall.nft", "action": "update", "detail": "content",
         "proxy": None},
        {"host": "vm1", "kind": "proxy", "subject": "db-5432", "action": "remove", "detail": "it left the inventory",
         "proxy": "db-5432"}]
    assert data["unreachable"] == {"vm3": "cannot connect to 10.0.0.13:22: timed out"}
    assert data["summary"] == summary_line(CHANGED) and data["exit_code"] == 0


def test_a_saved_plan_holds_the_digest_each_hosts_fingerprint_and_the_changes_but_no_diff() -> None:
    saved = json.loads(saved_plan(CHANGED, "inventory/lab.yaml", "d" * 64))
    assert saved["plan_digest"] == "d" * 64 and saved["inventory"] == "inventory/lab.yaml"
    assert saved["hosts"] == {"vm1": None, "vm2": None, "vm3": None}  # not observed with facts here
    assert saved["changes"] == change_set(CHANGED) and "old" not in json.dumps(saved)
