"""The demo app's behaviour file, run for real on 127.0.0.1: status, delay, fail every Nth request, the health
path left alone unless the file says otherwise, a broken file ignored, other methods answered, db's delay, and
`demoapp.py behave` writing and removing the file. Each instance is a child process this test ends by PID.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mesh.lab.demoapp

SCRIPT = Path(mesh.lab.demoapp.__file__)
HOP = {"service": "api", "version": "v2", "host": "dock1", "instance": "api-v2-1", "kind": "container"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., int]]:
    started: list[subprocess.Popen[bytes]] = []

    def run(*flags: str) -> int:
        port = _free_port()
        argv = [sys.executable, str(SCRIPT), "--service", "api", "--version", "v2", "--host", "dock1",
                "--instance", "api-v2-1", "--kind", "container", "--port", str(port), "--bind", "127.0.0.1",
                "--behaviour-dir", str(tmp_path), *flags]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(proc)
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port
            except OSError:
                assert time.monotonic() < deadline, f"nothing listens on {port}"
                time.sleep(0.02)

    yield run
    for proc in started:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:  # a loaded machine: never leave the app running
            proc.kill()
            proc.wait(timeout=5)


def behave(folder: Path, port: int, settings: dict[str, object] | None) -> None:
    argv = [sys.executable, str(SCRIPT), "behave", str(port), "--dir", str(folder)]
    if settings is not None:
        argv.append(json.dumps(settings))
    subprocess.run(argv, check=True, capture_output=True)


def ask(port: int, path: str = "/", method: str = "GET") -> tuple[int, dict[str, object] | bytes, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.monotonic()
    try:
        connection.request(method, path, body=b"x" if method == "POST" else None)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    took = time.monotonic() - started
    try:
        return response.status, json.loads(body), took
    except ValueError:
        return response.status, body, took


def test_no_file_is_normal_and_a_status_file_changes_every_answer_but_health(start: Callable[..., int],
                                                                             tmp_path: Path) -> None:
    port = start()
    assert ask(port)[:2] == (200, {"hops": [HOP]})
    behave(tmp_path, port, {"status": 500})
    status, body, _ = ask(port)
    assert status == 500 and isinstance(body, dict) and body["hops"] == [HOP]  # still says who answered
    assert ask(port, "/healthz")[:2] == (200, b"ok\n")
    behave(tmp_path, port, {"health_status": 503})
    assert ask(port, "/healthz")[0] == 503 and ask(port)[0] == 200
    behave(tmp_path, port, None)
    assert not (tmp_path / f"{port}.json").exists()
    assert ask(port, "/healthz")[:2] == (200, b"ok\n") and ask(port)[0] == 200


def test_fail_every_second_request(start: Callable[..., int], tmp_path: Path) -> None:
    port = start()
    behave(tmp_path, port, {"fail_every": 2, "fail_status": 502})
    statuses = [ask(port)[0] for _ in range(6)]
    assert sorted(statuses) == [200, 200, 200, 502, 502, 502]
    assert statuses[0] != statuses[1] and statuses[1] != statuses[2]
    behave(tmp_path, port, {"fail_every": 3})
    assert [ask(port)[0] for _ in range(6)].count(503) == 2  # fail_status defaults to 503


def test_delay_and_other_methods(start: Callable[..., int], tmp_path: Path) -> None:
    port = start()
    behave(tmp_path, port, {"delay_ms": 300})
    status, body, took = ask(port, "/orders", method="POST")
    assert status == 200 and body == {"hops": [HOP]} and took >= 0.3
    assert ask(port, "/healthz")[2] < 0.3  # the health path is not delayed


def test_a_broken_file_is_normal_behaviour(start: Callable[..., int], tmp_path: Path) -> None:
    port = start()
    (tmp_path / f"{port}.json").write_text("{not json")
    assert ask(port)[0] == 200
    (tmp_path / f"{port}.json").write_text('["status", 500]')
    assert ask(port)[0] == 200
    (tmp_path / f"{port}.json").write_text('{"status": "500"}')  # not an int: ignored
    assert ask(port)[0] == 200


def test_behave_refuses_unknown_keys_and_bad_json(tmp_path: Path) -> None:
    for text in ('{"statuss": 500}', "{oops"):
        done = subprocess.run([sys.executable, str(SCRIPT), "behave", "9090", text, "--dir", str(tmp_path)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 2 and "behave" in done.stderr, done
    assert list(tmp_path.iterdir()) == []


def test_tcp_delay(start: Callable[..., int], tmp_path: Path) -> None:
    port = start("--protocol", "tcp")
    behave(tmp_path, port, {"delay_ms": 200})
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        started = time.monotonic()
        conn.sendall(b"hop\n")
        assert json.loads(conn.makefile("rb").readline())["service"] == "api"
        assert time.monotonic() - started >= 0.2
