"""Rollouts on fake hosts as Ansible paces them: `serial` batches (counts, percentages, lists) that each run the
whole play, `max_fail_percentage` and a batch that failed entirely stopping the run with the rest untouched,
the recap saying so, and the retry file naming what is left."""

from __future__ import annotations

from pathlib import Path

import pytest
from runner_helpers import managed, run

from mesh.deploy.pacing import PacingError, exceeds, parse_max_fail_percentage, parse_serial
from mesh.deploy.recap import exit_code
from mesh.errors import InventoryErrors
from mesh.hosts.connection import CommandResult
from mesh.testing.fake_connector import FakeFleet

HOSTS = ("vm1", "vm2", "vm3", "vm4", "vm5")


def rollout(serial: object = None, max_fail: object = None, gate_tags: str = "") -> str:
    """A play whose second task is a gate that may fail (stubbed per host), and a handler."""
    keywords = "".join(f"  {key}: {value}\n" for key, value in (("serial", serial),
                                                                  ("max_fail_percentage", max_fail))
                       if value is not None)
    return f"""
- name: roll
  hosts: all
{keywords}  tasks:
    - name: change
      command: deploy-change
      notify: reload
    - name: gate
      command: health-gate
{gate_tags}  handlers:
    - name: reload
      command: reload-proxy
"""


def fleet(*failing: str, unreachable: tuple[str, ...] = ()) -> FakeFleet:
    made = FakeFleet()
    for name in HOSTS:
        host = made.host(name)
        host.stub("deploy-change|reload-proxy", CommandResult(0, b"", b""))
        host.stub("health-gate", CommandResult(1 if name in failing else 0, b"", b"gate: upstream unhealthy"))
        if name in unreachable:
            host.unreachable = "cannot connect to 10.0.0.9:22: timed out"
    return made


def touched(fleet_: FakeFleet) -> list[str]:
    return [name for name in HOSTS if fleet_.host(name).commands]


def play_headers(output: str) -> int:
    return output.count("PLAY [roll] ")


# ---- reading the values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "total", "sizes"), [
    (1, 5, [1, 1, 1, 1, 1]), ("2", 5, [2, 2, 1]), ("40%", 5, [2, 2, 1]), ("10%", 5, [1, 1, 1, 1, 1]),
    ([1, 2, "100%"], 5, [1, 2, 2]), ("1,50%", 4, [1, 2, 1]), (0, 3, [3]), ("100%", 3, [3]), ([1, 0], 4, [1, 3]),
])
def test_serial_cuts_hosts_into_batches_as_ansible(value: object, total: int, sizes: list[int]) -> None:
    assert parse_serial(value).sizes(total) == sizes


@pytest.mark.parametrize("value", ["abc", "-1", "150%", [], [1, "x"], True, 1.5])
def test_serial_refuses_what_is_not_a_count_or_a_percentage(value: object) -> None:
    with pytest.raises(PacingError):
        parse_serial(value)


def test_max_fail_percentage_is_exceeded_strictly() -> None:
    assert parse_max_fail_percentage("25%") == 25 and parse_max_fail_percentage(0) == 0
    for bad in ("x", -1, 101, True, "nan"):
        with pytest.raises(PacingError):
            parse_max_fail_percentage(bad)
    assert exceeds(1, 4, 0) and not exceeds(1, 4, 25) and exceeds(2, 4, 25) and not exceeds(4, 4, 100)
    assert not exceeds(3, 3, None)


def test_the_playbook_reader_names_a_bad_keyword_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(InventoryErrors) as caught:
        run(tmp_path, rollout(serial='"abc"', max_fail='"{{ x }}"'), fleet(), managed(*HOSTS))
    text = "\n".join(str(error) for error in caught.value.errors)
    assert "play.yml:4" in text and "serial" in text and "counts and percentages" in text
    assert "max_fail_percentage" in text and "--max-fail-percentage" in text


# ---- batches ----------------------------------------------------------------------------------------------------


def test_each_batch_runs_the_whole_play_handlers_included_before_the_next(tmp_path: Path) -> None:
    fleet_ = fleet()
    result = run(tmp_path, rollout(serial=2), fleet_, managed(*HOSTS))
    assert result.code == 0 and play_headers(result.output) == 3
    tasks = [line for line in result.output.splitlines() if line.startswith(("TASK [", "RUNNING HANDLER ["))]
    assert [line.split(" *")[0] for line in tasks] == ["TASK [change]", "TASK [gate]", "RUNNING HANDLER [reload]"] * 3
    # vm3 (second batch) changed only after vm1's handler (first batch) ran
    order = result.output.index("changed: [vm3]")
    assert result.output.index("RUNNING HANDLER [reload]") < order


def test_a_batch_that_failed_entirely_stops_the_rollout_and_leaves_the_rest_untouched(tmp_path: Path) -> None:
    fleet_ = fleet("vm2")
    result = run(tmp_path, rollout(serial=1), fleet_, managed(*HOSTS))
    assert result.code == 2
    assert touched(fleet_) == ["vm1", "vm2"]
    assert result.result.stopped is not None
    assert result.result.stopped.not_reached == ("vm3", "vm4", "vm5")
    recap = result.output[result.output.index("PLAY RECAP"):]
    assert ("STOPPED: the rollout stopped in play [roll] batch 2/5: 1 of 1 hosts failed (every host of the "
            "batch: vm2); not deployed: vm3, vm4, vm5") in recap
    assert "vm3" not in recap.split("STOPPED")[0]  # untouched hosts have no recap line, as in Ansible


def test_without_max_fail_percentage_a_partly_failed_batch_goes_on(tmp_path: Path) -> None:
    fleet_ = fleet("vm1")
    result = run(tmp_path, rollout(serial=2), fleet_, managed(*HOSTS))
    assert result.result.stopped is None and touched(fleet_) == list(HOSTS)
    assert result.counts("vm1")["failed"] == 1 and result.counts("vm5")["failed"] == 0 and result.code == 2


def test_max_fail_percentage_stops_mid_batch_after_the_failing_task(tmp_path: Path) -> None:
    fleet_ = fleet("vm4")
    result = run(tmp_path, rollout(serial="4", max_fail=20), fleet_, managed(*HOSTS))
    stopped = result.result.stopped
    assert stopped is not None and stopped.failed == ("vm4",) and stopped.batch_size == 4
    assert stopped.stopped == ("vm1", "vm2", "vm3") and stopped.not_reached == ("vm5",)
    assert "RUNNING HANDLER" not in result.output  # the batch stopped: no handler ran
    assert fleet_.host("vm5").commands == []
    assert "(over max_fail_percentage 20: vm4)" in result.output and "NO MORE HOSTS LEFT" in result.output


def test_max_fail_percentage_below_the_threshold_goes_on(tmp_path: Path) -> None:
    fleet_ = fleet("vm1")
    result = run(tmp_path, rollout(serial=2, max_fail=50), fleet_, managed(*HOSTS))
    assert result.result.stopped is None and touched(fleet_) == list(HOSTS)


def test_max_fail_percentage_without_serial_applies_to_the_whole_play(tmp_path: Path) -> None:
    fleet_ = fleet("vm1")
    result = run(tmp_path, rollout(max_fail=0), fleet_, managed(*HOSTS))
    assert result.result.stopped is not None and result.result.stopped.batches == 1
    assert "reload-proxy" not in " ".join(fleet_.host("vm2").commands)


def test_unreachable_hosts_count_as_failed(tmp_path: Path) -> None:
    fleet_ = fleet(unreachable=("vm1",))
    result = run(tmp_path, rollout(serial=1), fleet_, managed(*HOSTS))
    assert exit_code(result.result) == 3 and result.result.stopped is not None
    assert result.result.stopped.not_reached == ("vm2", "vm3", "vm4", "vm5")


def test_options_override_the_plays_keywords(tmp_path: Path) -> None:
    fleet_ = fleet("vm1")
    result = run(tmp_path, rollout(serial=5), fleet_, managed(*HOSTS), serial=parse_serial(1),
                 max_fail_percentage=0.0)
    assert play_headers(result.output) == 1 and touched(fleet_) == ["vm1"]


def test_a_stop_leaves_later_plays_unrun(tmp_path: Path) -> None:
    fleet_ = fleet("vm1")
    text = rollout(serial=1) + """
- name: later
  hosts: vm4:vm5
  tasks:
    - command: deploy-change
"""
    result = run(tmp_path, text, fleet_, managed("vm1", "vm2", "vm4", "vm5"))
    assert result.result.stopped is not None and result.result.stopped.not_reached == ("vm2", "vm4", "vm5")
    assert "PLAY [later]" not in result.output


def test_a_failed_gate_counts_like_any_failed_host(tmp_path: Path) -> None:
    fleet_ = fleet("vm1", "vm2")
    result = run(tmp_path, rollout(serial="40%", max_fail=50), fleet_, managed(*HOSTS))
    assert result.result.stopped is not None and result.result.stopped.failed == ("vm1", "vm2")
    assert touched(fleet_) == ["vm1", "vm2"]


# ---- the retry file ----------------------------------------------------------------------------------------------


def test_the_retry_file_names_failed_unreachable_and_untouched_hosts(tmp_path: Path) -> None:
    retry = tmp_path / "state" / "deploy.retry"
    retry.parent.mkdir()
    result = run(tmp_path, rollout(serial=2, max_fail=0), fleet("vm2", unreachable=("vm1",)), managed(*HOSTS),
                 retry_file=retry)
    assert retry.read_text() == "vm1\nvm2\nvm3\nvm4\nvm5\n"
    assert f"to retry, use: --limit @{retry}" in result.output


def test_the_retry_file_drops_hosts_that_converged_and_goes_when_empty(tmp_path: Path) -> None:
    retry = tmp_path / "deploy.retry"
    run(tmp_path, rollout(), fleet("vm2", "vm3"), managed(*HOSTS), retry_file=retry)
    assert retry.read_text() == "vm2\nvm3\n"
    run(tmp_path, rollout(), fleet("vm3"), managed("vm2"), retry_file=retry)
    assert retry.read_text() == "vm3\n"  # vm3 was not in this run: still to retry
    result = run(tmp_path, rollout(), fleet(), managed("vm3"), retry_file=retry)
    assert not retry.exists() and "to retry" not in result.output


def test_check_mode_writes_no_retry_file(tmp_path: Path) -> None:
    retry = tmp_path / "deploy.retry"
    run(tmp_path, rollout(), fleet("vm2"), managed(*HOSTS), retry_file=retry, check=True)
    assert not retry.exists()


def test_converged_hosts_get_a_recap_line_and_leave_the_retry_file(tmp_path: Path) -> None:
    retry = tmp_path / "deploy.retry"
    retry.write_text("vm3\nvm2\n")
    result = run(tmp_path, rollout(), fleet("vm2"), managed("vm1", "vm2"), retry_file=retry, converged=["vm3"])
    assert result.counts("vm3") == {"ok": 0, "changed": 0, "unreachable": 0, "failed": 0, "skipped": 0,
                                    "ignored": 0}
    assert "vm3                        : ok=0" in result.output and retry.read_text() == "vm2\n"


def test_a_play_all_at_once_whose_hosts_all_failed_does_not_stop_later_plays(tmp_path: Path) -> None:
    text = rollout(serial='"100%"') + """
- name: later
  hosts: vm4:vm5
  tasks:
    - command: deploy-change
"""
    fleet_ = fleet("vm1", "vm2")
    result = run(tmp_path, text, fleet_, managed("vm1", "vm2", "vm4", "vm5"))
    assert result.result.stopped is None and "PLAY [later]" in result.output
    assert fleet_.host("vm5").commands.count("deploy-change") == 2  # in both plays
