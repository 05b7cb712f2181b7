"""The Consul watch's rules with a scripted fetch: the next index (reset when it goes backwards, never 0 after an
answer), backoff after errors, staleness shown while Consul does not answer, only changed answers delivered."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.controller.consul_watch import BACKOFF_MAX_S, Entries, ServiceWatch, backoff_s, next_index
from mesh.controller.endpoints import Endpoint, ServiceEndpoints
from mesh.testing.fake_ctl import MESH_ID


def instance(address: str, status: str = "passing") -> dict[str, Any]:
    return {"Node": {"Node": "n", "Address": address},
            "Service": {"ID": f"api-{address}", "Service": "api", "Address": address, "Port": 80,
                        "Meta": {"managed-by": "mesh", "mesh-id": MESH_ID}},
            "Checks": [{"Status": status}]}


def test_the_index_resets_when_it_goes_backwards_and_never_blocks_on_zero() -> None:
    assert next_index(0, 17) == 17
    assert next_index(17, 17) == 17
    assert next_index(17, 5) == 0
    assert next_index(0, 0) == 1


def test_backoff_doubles_up_to_its_ceiling() -> None:
    assert [backoff_s(n, jitter=lambda: 0.5) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff_s(50, jitter=lambda: 0.5) == BACKOFF_MAX_S


def test_answers_errors_and_staleness() -> None:
    time = [100.0]
    script: list[Any] = [(5, [instance("10.0.0.11")]), (6, [instance("10.0.0.11")]),
                         OSError("connection refused"), OSError("connection refused"),
                         (3, [instance("10.0.0.11", "critical"), instance("10.0.0.12")])]
    asked: list[int] = []
    delivered: list[ServiceEndpoints] = []
    slept: list[float] = []

    def fetch(service: str, index: int, wait: float) -> tuple[int, Entries]:
        assert service == "api"
        asked.append(index)
        answer = script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    watch = ServiceWatch("api", MESH_ID, fetch, delivered.append, clock=lambda: time[0], sleep=slept.append)
    time[0] += 3
    assert watch.staleness_s() == 3  # nothing answered yet
    watch.step()
    watch.step()  # the same instances again: not delivered twice
    assert [seen.up for seen in delivered] == [(Endpoint("10.0.0.11", 80, "api", "", "api-10.0.0.11"),)]
    assert watch.staleness_s() == 0
    watch.step()
    time[0] += 7
    watch.step()
    assert watch.staleness_s() == 7 and len(delivered) == 1
    assert slept[-2] < slept[-1]  # backing off
    watch.step()  # back, with an index that went backwards (Consul restarted)
    assert asked == [0, 5, 6, 6, 6]
    assert watch.index == 0 and watch.staleness_s() == 0  # the next query reads afresh
    assert delivered[-1].up == (Endpoint("10.0.0.12", 80, "api", "", "api-10.0.0.12"),)


@pytest.mark.parametrize("returned", [0, -1])
def test_a_zero_index_does_not_spin(returned: int) -> None:
    watch = ServiceWatch("api", MESH_ID, lambda *_: (returned, []), lambda _seen: None, sleep=lambda _s: None)
    watch.step()
    assert watch.index == 1
