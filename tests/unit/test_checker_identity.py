"""The checker reloads its client certificate when its `tls` link is swapped (a renewal by a deploy or a
controller), before the next round's probes, without a restart; a half-done renewal keeps the last good one."""

from __future__ import annotations

import dataclasses
import os
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh.healthcheck.checker import HealthChecker
from mesh.healthcheck.config import Instance, parse_config
from mesh.healthcheck.identity import ClientIdentity
from mesh.healthcheck.probe import ProbeResult, client_context, probe
from mesh.testing.health_endpoint import HealthEndpoint, LeafFiles, TestCA

TD = "lab.mesh"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, LeafFiles]:
    ca, other = TestCA(tmp_path / "pki"), TestCA(tmp_path / "pki" / "other", "other CA")
    return {"api": ca.issue(f"spiffe://{TD}/svc/api", "api"),
            "checker": ca.issue(f"spiffe://{TD}/mesh/health", "checker"),
            "foreign": other.issue(f"spiffe://{TD}/mesh/health", "foreign")}


def install(home: Path, version: str, leaf: LeafFiles, key: LeafFiles | None = None) -> None:
    """What `mesh-ctl install` does: a new tls.VERSION folder, the `tls` link swapped in one rename."""
    folder = home / f"tls.{version}"
    folder.mkdir()
    shutil.copy(leaf.cert, folder / "cert.pem")
    shutil.copy((key or leaf).key, folder / "key.pem")
    os.symlink(folder.name, home / "tls.next")
    os.replace(home / "tls.next", home / "tls")


def identity_in(home: Path, ca: Path) -> ClientIdentity:
    return ClientIdentity(str(home / "tls" / "cert.pem"), str(home / "tls" / "key.pem"), str(ca))


def checker_probing(identity: ClientIdentity, port: int) -> tuple[HealthChecker, list[ProbeResult]]:
    base = parse_config({"consul_url": "http://127.0.0.1:1", "trust_domain": TD, "cert": "c", "key": "k",
                         "ca": "a", "interval": 0.05,
                         "instances": [{"id": "api-h-1", "service": "api", "host": "h", "address": "127.0.0.1",
                                        "proxy_port": port}]})
    written: list[ProbeResult] = []

    class Leading:
        def step(self) -> bool:
            return True

        def holds(self) -> bool:
            return True

        def release(self) -> None:
            pass

    checker = HealthChecker(base, Leading(), lambda instance: probe(identity.context, instance, base),
                            lambda instance, result: written.append(result), before_round=identity.refresh)
    return checker, written


def test_a_swapped_tls_link_is_used_from_the_next_round_without_a_restart(
        tmp_path: Path, pki: dict[str, LeafFiles]) -> None:
    home = tmp_path / "checker"
    home.mkdir()
    install(home, "1", pki["foreign"])  # a leaf the instance refuses: critical
    identity = identity_in(home, pki["checker"].ca)
    with HealthEndpoint(pki["api"], TD) as endpoint:
        checker, written = checker_probing(identity, endpoint.port)
        stop = threading.Event()
        runner = threading.Thread(target=checker.run, args=(stop,))
        runner.start()
        try:
            _wait(lambda: bool(written), "a first round")
            assert written[0].status == "critical"
            install(home, "2", pki["checker"])  # renewed: a leaf of the mesh CA
            _wait(lambda: written[-1].status == "passing", "the renewed certificate passing")
        finally:
            stop.set()
            runner.join(timeout=5)
    assert not runner.is_alive()


def test_refresh_rebuilds_only_on_change_and_keeps_the_last_good_context(
        tmp_path: Path, pki: dict[str, LeafFiles]) -> None:
    home = tmp_path / "checker"
    home.mkdir()
    install(home, "1", pki["checker"])
    made: list[str] = []

    def make(cert: str, key: str, ca: str) -> ssl.SSLContext:
        made.append(cert)
        return client_context(cert, key, ca)

    identity = ClientIdentity(str(home / "tls/cert.pem"), str(home / "tls/key.pem"), str(pki["checker"].ca),
                              make=make)
    first = identity.context
    assert made == [str(home / "tls.1" / "cert.pem")], "loaded through the resolved link"
    assert identity.refresh() is False and identity.context is first and len(made) == 1
    install(home, "2", pki["checker"], key=pki["api"])  # a certificate beside a key that is not its own
    assert identity.refresh() is False and identity.context is first, "a broken renewal keeps the last context"
    assert identity.refresh() is False and len(made) == 3, "and is tried again the next round"
    install(home, "3", pki["api"])
    assert identity.refresh() is True and identity.context is not first
    assert made[-1] == str(home / "tls.3" / "cert.pem")


def _wait(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {deadline:g}s: {what}")


def test_the_checker_builds_a_reloading_identity(tmp_path: Path, pki: dict[str, LeafFiles]) -> None:
    from mesh.healthcheck.__main__ import build_checker

    home = tmp_path / "checker"
    home.mkdir()
    install(home, "1", pki["checker"])
    config = dataclasses.replace(
        parse_config({"consul_url": "http://127.0.0.1:1", "trust_domain": TD, "cert": str(home / "tls/cert.pem"),
                      "key": str(home / "tls/key.pem"), "ca": str(pki["checker"].ca)}),
        instances=(Instance("api-h-1", "api", "h", "127.0.0.1", 1),))
    checker = build_checker(config)
    assert checker.before_round is not None
    install(home, "2", pki["checker"])
    assert checker.before_round() is True
