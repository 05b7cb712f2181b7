"""The controller's loop (mesh.controller.daemon.Controller.tick) with fake hosts, a fake lock and a fake Consul KV,
on a clock the test moves: a burst of Consul answers is pushed once after the debounce, an empty answer keeps the
endpoints, nothing is pushed without the lock (checked right before the push) or while a deploy holds its lock,
a standby does nothing but try the lock, renewals happen at their time, the state is published."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.controller.daemon import Controller, ControllerOptions
from mesh.controller.endpoints import Endpoint, ServiceEndpoints
from mesh.controller.protocol import CertState
from mesh.controller.spec import ControllerSpec, issued_prefix
from mesh.pki.certs import Issuer, build_intermediate, build_root, new_ca_key
from mesh.render import ProxyFiles
from mesh.testing.fake_ctl import (
    TRUST_DOMAIN,
    FakeCtlHost,
    FakeCtlTransport,
    controller_spec,
    host_spec,
    proxy_spec,
    web_files,
)

EDS = "xds/eds.upstream-api.yaml"
START = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@dataclass
class FakeLeader:
    leading: bool = True
    answers: list[bool] = field(default_factory=list)  # holds() answers to give first, in order
    steps: int = 0
    released: bool = False

    def step(self) -> bool:
        self.steps += 1
        return self.leading

    def holds(self) -> bool:
        return self.answers.pop(0) if self.answers else self.leading

    def release(self) -> None:
        self.released = True


@dataclass
class FakeStore:
    locked: bool = False
    puts: dict[str, str] = field(default_factory=dict)

    def deploy_locked(self) -> bool:
        return self.locked

    def put(self, key: str, value: str) -> None:
        self.puts[key] = value

    def values(self, prefix: str) -> list[bytes]:
        return [value.encode() for key, value in sorted(self.puts.items()) if key.startswith(prefix)]


@dataclass
class Loop:
    controller: Controller
    host: FakeCtlHost
    proxy: str
    leader: FakeLeader
    store: FakeStore
    time: list[float]

    def at(self, seconds: float) -> float:
        self.time[0] = seconds
        return self.controller.tick()

    def answer(self, *up: Endpoint, registered: tuple[Endpoint, ...] = (), when: float | None = None) -> None:
        """Consul's answer for api, arriving at `when` (by default at the time of the last pass)."""
        if when is not None:
            self.time[0] = when
        self.controller.on_answer(ServiceEndpoints("api", tuple(sorted(set(up) | set(registered))), tuple(up)))

    def eds(self) -> str:
        return self.host.files[self.proxy][EDS]

    def applies(self) -> int:
        return self.host.calls.count("apply")


def write_intermediate(folder: Path) -> tuple[str, str]:
    now = datetime.now(UTC)
    root_key, key = new_ca_key(), new_ca_key()
    root = build_root(root_key, TRUST_DOMAIN, now)
    cert = build_intermediate(Issuer(root, root_key), key, TRUST_DOMAIN, now)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "intermediate.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "intermediate.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(folder / "intermediate.pem"), str(folder / "intermediate.key")


def make_loop(tmp_path: Path, leader: FakeLeader | None = None, cert: CertState | None = None,
              cert_ttl_s: int = 3600) -> Loop:
    files = web_files(tmp_path / "vm1" / "web")
    spec = controller_spec((host_spec("vm1", (proxy_spec(files),)),), cert_ttl_s=cert_ttl_s)
    host = FakeCtlHost("vm1")
    host.add_proxy(files, cert or CertState("01", START - timedelta(hours=1), START + timedelta(days=1)))
    time = [0.0]
    leader = leader or FakeLeader()
    store = FakeStore()
    cert_path, key_path = write_intermediate(tmp_path / "ca")
    validated: list[ProxyFiles] = []

    def loaded() -> ControllerSpec:
        return spec

    controller = Controller(
        loaded, ControllerOptions(intermediate_cert=cert_path, intermediate_key=key_path, holder="ctl-test",
                                  serve_metrics=False),
        transport=FakeCtlTransport({"vm1": host}), validate=validated.append, leader=lambda _spec, _holder: leader,
        store=lambda _spec: store, clock=lambda: time[0], wall=lambda: 1_765_000_000 + time[0],
        now=lambda: START + timedelta(seconds=time[0]), watch=False)
    return Loop(controller, host, files.proxy, leader, store, time)


@pytest.fixture
def loop(tmp_path: Path) -> Loop:
    made = make_loop(tmp_path)
    made.at(0.0)
    made.at(0.06)  # the first round: the host's state
    assert made.host.calls == ["state"]
    return made


def test_a_burst_of_answers_is_pushed_once_after_the_debounce(loop: Loop) -> None:
    loop.answer(Endpoint("10.0.0.11", 1), when=1.0)
    assert loop.at(1.01) == pytest.approx(0.04)
    loop.answer(Endpoint("10.0.0.12", 1))
    loop.at(1.03)
    loop.answer(Endpoint("10.0.0.12", 1), Endpoint("10.0.0.13", 1))
    loop.at(1.049)
    assert loop.applies() == 0
    loop.at(1.051)
    assert loop.applies() == 1
    assert "10.0.0.13" in loop.eds() and "10.0.0.11" not in loop.eds()


def test_an_answer_listing_no_instance_keeps_the_endpoints(loop: Loop) -> None:
    loop.answer(Endpoint("10.0.0.11", 1))
    loop.at(1.1)
    before = loop.eds()
    loop.answer()  # Consul lists none of this mesh's instances
    loop.at(3.0)
    assert loop.eds() == before and loop.applies() == 1


def test_every_instance_critical_puts_them_all_back(loop: Loop) -> None:
    loop.answer(Endpoint("10.0.0.11", 1))
    loop.at(1.1)
    loop.answer(registered=(Endpoint("10.0.0.11", 1), Endpoint("10.0.0.12", 1)))
    loop.at(2.2)
    assert "10.0.0.11" in loop.eds() and "10.0.0.12" in loop.eds()


def test_the_lock_is_checked_right_before_the_push(loop: Loop) -> None:
    loop.answer(Endpoint("10.0.0.11", 1))
    loop.leader.answers = [True, False]  # leading when the pass starts, no longer when the push would go
    loop.at(1.1)
    assert loop.applies() == 0
    loop.at(2.2)  # the lock back: the same snapshot is pushed
    assert loop.applies() == 1


def test_nothing_is_pushed_while_a_deploy_holds_its_lock(loop: Loop) -> None:
    loop.store.locked = True
    loop.answer(Endpoint("10.0.0.11", 1))
    loop.at(1.1)
    loop.at(1.7)
    assert loop.applies() == 0
    loop.store.locked = False
    loop.at(2.3)
    assert loop.applies() == 1 and "10.0.0.11" in loop.eds()


def test_the_hosts_are_read_again_when_a_deploy_releases_its_lock(loop: Loop) -> None:
    loop.answer(Endpoint("10.0.0.11", 1))
    loop.at(1.1)
    reads = loop.host.calls.count("state")
    loop.store.locked = True
    loop.at(2.2)
    loop.store.locked = False
    loop.at(3.3)  # well inside STATE_REFRESH_S: only the deploy's release makes the controller read again
    assert loop.host.calls.count("state") == reads + 1


def test_a_standby_only_tries_the_lock(tmp_path: Path) -> None:
    standby = make_loop(tmp_path, leader=FakeLeader(leading=False))
    for moment in (0.0, 1.0, 5.0, 10.0):
        standby.answer(Endpoint("10.0.0.11", 1))
        standby.at(moment)
    assert standby.host.calls == [] and standby.store.puts == {}
    assert standby.leader.steps >= 3
    assert standby.controller.metrics.value("mesh_controller_leader") == 0


def test_the_state_is_published_with_versions_and_certificates(loop: Loop) -> None:
    loop.answer(Endpoint("10.0.0.11", 1))
    loop.at(1.1)
    document = json.loads(loop.store.puts[loop.controller.spec.state_key])
    key = f"vm1/{loop.proxy}"
    assert document["holder"] == "ctl-test" and document["plan_digest"] == "d" * 64
    assert document["proxies"][key]["version"] == document["proxies"][key]["host_version"]
    assert document["proxies"][key]["pushed_at"] == pytest.approx(1_765_000_001.1)
    assert document["certificates"][key]["serial"] == "01"
    assert document["hosts_behind"] == [] and document["consul_stale_s"] == 0
    assert loop.controller.metrics.value("mesh_controller_leader") == 1


def test_a_certificate_is_renewed_at_its_fraction_and_recorded(tmp_path: Path) -> None:
    cert = CertState("01", START - timedelta(seconds=6), START + timedelta(seconds=54))  # 60 s, 6 s backdated
    loop = make_loop(tmp_path, cert=cert, cert_ttl_s=60)
    loop.at(0.06)
    loop.at(23.0)  # renew at not_after - 30 s = START + 24 s
    assert not any(call.startswith("csr") for call in loop.host.calls)
    loop.at(24.5)
    assert [call.split()[0] for call in loop.host.calls if call.split()[0] in ("csr", "install")] == ["csr", "install"]
    renewed = loop.host.certs[loop.proxy]
    assert renewed is not None and renewed.serial != "01"
    assert renewed.not_after == START + timedelta(seconds=24.5 + 60) - timedelta(microseconds=500_000)
    assert START + timedelta(seconds=24.5) - renewed.not_before == timedelta(seconds=6.5)  # backdated ttl/10
    [(key, text)] = [(key, value) for key, value in loop.store.puts.items()
                     if key.startswith(issued_prefix(loop.controller.spec.mesh_id))]
    record = json.loads(text)
    assert key.endswith(record["serial"]) and record["host"] == "vm1" and record["proxy"] == loop.proxy
    assert record["spiffe_id"] == f"spiffe://{TRUST_DOMAIN}/svc/web"
    assert int(renewed.serial, 16) == int(record["serial"], 16)
    loop.at(30.0)  # renewed: not due again
    assert [call.split()[0] for call in loop.host.calls].count("csr") == 1
    remaining = loop.controller.metrics.value("mesh_controller_certificate_remaining_seconds",
                                              {"host": "vm1", "identity": loop.proxy})
    assert remaining == pytest.approx(54.0, abs=1.0)


def test_stop_releases_the_lock(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    runner = threading.Thread(target=loop.controller.run)
    runner.start()
    loop.controller.stop()
    runner.join(timeout=10)
    assert not runner.is_alive() and loop.leader.released


def test_leaf_chain_is_leaf_then_intermediate(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, cert=None)
    loop.at(0.06)
    cert = loop.host.certs[loop.proxy]
    assert cert is not None  # an identity without a certificate gets one
    signer = loop.controller.renewer.signer if loop.controller.renewer else None
    assert signer is not None
    assert signer.cert.subject == x509.load_pem_x509_certificate(
        Path(tmp_path / "ca" / "intermediate.pem").read_bytes()).subject


def test_a_restarted_controller_keeps_the_hosts_endpoints_until_consul_answers(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    fresher = loop.eds().replace("127.0.0.3", "10.9.9.9")  # what a controller before this one wrote
    assert fresher != loop.eds()
    loop.host.files[loop.proxy][EDS] = fresher
    loop.at(0.06)
    loop.at(5.0)
    assert loop.applies() == 0 and loop.eds() == fresher
    document = json.loads(loop.store.puts[loop.controller.spec.state_key])
    assert document["hosts_behind"] == [] and document["plan_digest"] == "d" * 64
    proxy = document["proxies"][f"vm1/{loop.proxy}"]
    assert proxy["version"] == proxy["host_version"]

    loop.answer(Endpoint("10.0.0.11", 1), when=6.0)
    loop.at(6.1)
    assert loop.applies() == 1 and "10.0.0.11" in loop.eds() and "10.9.9.9" not in loop.eds()


def test_a_missing_endpoint_file_gets_the_plans_until_consul_answers(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    planned = loop.eds()
    del loop.host.files[loop.proxy][EDS]
    loop.at(0.06)
    assert loop.applies() == 1 and loop.eds() == planned


def test_the_running_loop_waits_between_passes(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    loop.controller.clock = loop.controller.pusher.clock = time.monotonic
    passes = []
    tick = loop.controller.tick

    def counted() -> float:
        passes.append(time.monotonic())
        return tick()

    loop.controller.tick = counted  # type: ignore[method-assign]
    runner = threading.Thread(target=loop.controller.run)
    runner.start()
    time.sleep(2.0)
    loop.controller.stop()
    runner.join(timeout=10)
    assert 2 <= len(passes) <= 10  # a pass per round (1 s) and lock renewal, no busy loop
    assert loop.leader.steps >= 1


class StreamsServer:
    """An ADS server as the controller's feed sees it: `status()` gives its streams."""

    def __init__(self, streams: dict[str, object]) -> None:
        self.streams = streams

    def status(self) -> dict[str, object]:
        return self.streams


def test_the_ads_streams_are_published_in_chunks_that_merge_back_whole(loop: Loop) -> None:
    """A Consul KV value holds at most 512 KiB: 450 streams go out as three values under the controller's name,
    each small enough, and `mesh status`'s merge of them gives every stream back."""
    import json

    from mesh.controller.spec import xds_status_prefix
    from mesh.xds.status import StreamStatus, TypeStatus, merged, parse_publication

    version = "f" * 64
    streams = {f"web-h{n:04d}-8080": StreamStatus(f"web-h{n:04d}-8080", f"10.1.{n // 250}.{n % 250}:40000", 1.0,
                                                  tuple(TypeStatus(kind, "synced", version, version, None, 1)
                                                        for kind in ("CDS", "EDS", "LDS", "RDS", "SDS", "ECDS")))
               for n in range(450)}
    loop.controller.xds.server = StreamsServer(streams)
    loop.controller._publish_xds()
    prefix = xds_status_prefix(loop.controller.spec.mesh_id)
    written = {key: value for key, value in loop.store.puts.items() if key.startswith(prefix)}
    assert sorted(written) == [f"{prefix}ctl-test/{n}" for n in range(3)]
    assert all(len(value.encode()) < 512 * 1024 for value in written.values())
    back = merged([parse_publication(value) for value in loop.store.values(prefix)], 1_765_000_000.0)
    assert sorted(back) == sorted(streams)
    assert {item.state for stream in back.values() for item in stream.types} == {"synced"}
    assert json.loads(written[f"{prefix}ctl-test/2"])["controller"] == "ctl-test"
