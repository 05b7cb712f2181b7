"""The start step of xds proxies (templates/host/envoy-start), run for real by `sh` against loopback ports: it execs
Envoy (here a fake that prints its arguments) with envoy-ads.yaml when a controller of its first line takes a TCP
connection, else with envoy.yaml, writes which to admin/delivery and says why on stderr. Also what the sidecar
image of xds container hosts carries for it."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.config.xds import CONTROLLERS_COMMENT, START_PROBE_TIMEOUT_S
from mesh.containers import image
from mesh.render import TEMPLATES_DIR, envoy_start_script

SCRIPT = TEMPLATES_DIR / "host" / "envoy-start"
FAKE_ENVOY = "#!/bin/sh\nfor a in \"$@\"; do printf 'ARG %s\\n' \"$a\"; done\n"


@pytest.fixture
def listening() -> Iterator[int]:
    """A loopback port that takes connections (a controller's ADS port, as far as a TCP probe can tell)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture
def closed() -> int:
    """A loopback port nothing listens on (the connect is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _proxy(tmp_path: Path, first_line: str | None) -> tuple[Path, Path]:
    """A proxy folder (with a space in its path: everything is quoted) and the fake Envoy."""
    proxy = tmp_path / "proxies dir" / "web-8080"
    (proxy / "admin").mkdir(parents=True)
    (proxy / "envoy.yaml").write_text("node: {}\n")
    if first_line is not None:
        (proxy / "envoy-ads.yaml").write_text(first_line + "\nnode: {}\n")
    envoy = tmp_path / "fake envoy"
    envoy.write_text(FAKE_ENVOY)
    envoy.chmod(0o755)
    return proxy, envoy


def _start(proxy: Path, envoy: Path, *args: str, shell: str = "sh") -> subprocess.CompletedProcess[str]:
    return subprocess.run([shell, str(SCRIPT), str(proxy), str(envoy), *args], capture_output=True, text=True,
                          timeout=30, check=False)


# The host's /bin/sh (dash on Debian), and bash: the sidecar image's /bin/sh.
SHELLS = pytest.mark.parametrize("shell", ["sh", "bash"])


def _envoy_args(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert done.returncode == 0, done.stderr
    return [line[len("ARG "):] for line in done.stdout.splitlines()]


@SHELLS
def test_a_controller_that_answers_starts_envoy_over_ads(tmp_path: Path, closed: int, listening: int,
                                                         shell: str) -> None:
    proxy, envoy = _proxy(tmp_path, f"{CONTROLLERS_COMMENT} 127.0.0.1:{closed} 127.0.0.1:{listening}")
    done = _start(proxy, envoy, "--base-id", "7", "--log-level", "warn level", shell=shell)
    assert _envoy_args(done) == ["-c", f"{proxy}/envoy-ads.yaml", "--base-id", "7", "--log-level", "warn level"]
    assert (proxy / "admin" / "delivery").read_text() == "xds\n"
    assert done.stderr == (f"envoy-start: starting Envoy with {proxy}/envoy-ads.yaml (xds): controller "
                           f"127.0.0.1:{listening} answered\n")


@SHELLS
def test_no_controller_answering_starts_envoy_from_the_files(tmp_path: Path, closed: int, shell: str) -> None:
    proxy, envoy = _proxy(tmp_path, f"{CONTROLLERS_COMMENT} 127.0.0.1:{closed} [::1]:x 127.0.0.1:{closed}")
    (proxy / "admin" / "delivery").write_text("xds\n")  # what the previous Envoy started with
    done = _start(proxy, envoy, "--base-id", "7", shell=shell)
    assert _envoy_args(done) == ["-c", f"{proxy}/envoy.yaml", "--base-id", "7"]
    assert (proxy / "admin" / "delivery").read_text() == "files\n"
    assert done.stderr == (f"envoy-start: starting Envoy with {proxy}/envoy.yaml (files): no controller answered "
                           f"within {START_PROBE_TIMEOUT_S} s (tried: 127.0.0.1:{closed} 127.0.0.1:{closed})\n")


def test_a_controller_that_never_answers_costs_the_probe_timeout(tmp_path: Path) -> None:
    """A listener whose backlog is full (SYNs dropped, as from a host that is gone): the probe gives up in time."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        for _ in range(8):  # fill the accept queue: further connects hang
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        proxy, envoy = _proxy(tmp_path, f"{CONTROLLERS_COMMENT} 127.0.0.1:{port}")
        started = time.monotonic()
        done = _start(proxy, envoy)
        took = time.monotonic() - started
        for filler in fillers:
            filler.close()
    assert _envoy_args(done) == ["-c", f"{proxy}/envoy.yaml"]
    assert "no controller answered" in done.stderr
    assert START_PROBE_TIMEOUT_S - 0.2 < took < START_PROBE_TIMEOUT_S + 5


@pytest.mark.parametrize(("first_line", "why"), [
    (None, "no envoy-ads.yaml"),
    ("node: {}", "envoy-ads.yaml does not start with '# mesh-xds-controllers:'"),
    (f"{CONTROLLERS_COMMENT} $(touch /tmp/mesh-envoy-start-pwned):1 ;id:2 127.0.0.1:", "no controller answered"),
])
def test_no_usable_ads_bootstrap_starts_envoy_from_the_files(tmp_path: Path, first_line: str | None, why: str) -> None:
    proxy, envoy = _proxy(tmp_path, first_line)
    done = _start(proxy, envoy)
    assert _envoy_args(done) == ["-c", f"{proxy}/envoy.yaml"]
    assert (proxy / "admin" / "delivery").read_text() == "files\n"
    assert why in done.stderr
    assert not Path("/tmp/mesh-envoy-start-pwned").exists()


def test_an_unwritable_marker_does_not_stop_envoy(tmp_path: Path) -> None:
    proxy, envoy = _proxy(tmp_path, None)
    (proxy / "admin").rmdir()
    done = _start(proxy, envoy)
    assert _envoy_args(done) == ["-c", f"{proxy}/envoy.yaml"]
    assert f"cannot write {proxy}/admin/delivery (starting anyway)" in done.stderr


def test_usage_without_a_proxy_folder_and_envoy() -> None:
    done = subprocess.run(["sh", str(SCRIPT), "/etc/mesh/proxies/web-8080"], capture_output=True, text=True,
                          timeout=10, check=False)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("envoy-start: usage: envoy-start PROXY_DIR ENVOY")


def test_the_installed_script_is_the_template_and_a_posix_sh_script() -> None:
    assert envoy_start_script() == SCRIPT.read_text()
    assert SCRIPT.read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(SCRIPT)], check=False).returncode == 0


def test_the_image_of_xds_sidecars_carries_the_start_steps_shell_and_timeout(tmp_path: Path) -> None:
    tools = image.start_step_tools()
    assert [path for path, _source in tools] == ["/bin/sh", "/bin/bash", "/usr/bin/timeout"]
    libraries = tuple(sorted({library for _path, source in tools for library in image.shared_libraries(source)}))
    files = image.image_files(Path("/bin/true"), libraries, tools)
    paths = [item.path for item in files]
    assert {"/bin/sh", "/bin/bash", "/usr/bin/timeout", image.ENVOY_IN_IMAGE} <= set(paths)
    assert any("libc.so" in path for path in paths)
    assert [item.path for item in image.image_files(Path("/bin/true"), ())] == [image.ENVOY_IN_IMAGE]


def test_an_ipv6_controller_is_probed_at_its_address_and_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as server:
        server.bind(("::1", 0))
        server.listen(8)
        proxy, envoy = _proxy(tmp_path, f"{CONTROLLERS_COMMENT} ::1:{server.getsockname()[1]}")
        done = _start(proxy, envoy)
    assert _envoy_args(done) == ["-c", f"{proxy}/envoy-ads.yaml"]
