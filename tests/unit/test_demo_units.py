"""Golden files for the demo app's systemd units and `docker run` arguments (tests/golden/demo/).

`pytest --update-goldens` rewrites them so a reviewer reads the diff of what changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.lab.demo_units import DemoInstance, app_flags, docker_run_args, image_name, render_unit, unit_name

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "demo"

WEB = DemoInstance("web", "v1", 8080, "vm1", "vm1", "vm", (("api", "127.0.0.1", 19101),))
API_V1 = DemoInstance("api", "v1", 9090, "vm2", "vm2", "vm", (("db", "127.0.0.1", 19102),))
DB = DemoInstance("db", "v1", 5432, "vm3", "vm3", "vm")
API_V2 = DemoInstance("api", "v2", 9090, "dock1", "api-v2-1", "container", (("db", "127.0.0.1", 19102),))


def check_golden(name: str, text: str, update: bool) -> None:
    path = GOLDEN / name
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run pytest --update-goldens"
    assert text == path.read_text(), f"{path} differs: run pytest --update-goldens and review the diff"


@pytest.mark.parametrize("instance", [WEB, API_V1, DB], ids=lambda i: f"{i.service}-{i.host}")
def test_unit_golden(instance: DemoInstance, update_goldens: bool) -> None:
    check_golden(f"{instance.service}-{instance.host}.service", render_unit(instance), update_goldens)


def test_docker_run_golden(update_goldens: bool) -> None:
    args = docker_run_args(API_V2, image_name("0123456789abcdef"))
    check_golden("api-v2-1.docker-run.txt", "\n".join(args) + "\n", update_goldens)


def test_unit_name_and_install_section() -> None:
    assert unit_name(WEB) == "mesh-demo-web.service"
    text = render_unit(WEB)
    assert "Restart=always" in text and "WantedBy=multi-user.target" in text


def test_container_publishes_nothing_and_is_limited() -> None:
    args = docker_run_args(API_V2, "mesh-demo-app:k")
    assert "-p" not in args and "--publish" not in args
    assert args[args.index("-m") + 1] == "64m"
    assert args[args.index("--network") + 1] == "mesh-demo"
    assert args[args.index("--name") + 1] == "api-v2-1"


def test_db_speaks_tcp_and_the_rest_http() -> None:
    assert app_flags(DB)[app_flags(DB).index("--protocol") + 1] == "tcp"
    assert app_flags(WEB)[app_flags(WEB).index("--protocol") + 1] == "http"


def test_kinds_are_not_mixed() -> None:
    with pytest.raises(ValueError):
        render_unit(API_V2)
    with pytest.raises(ValueError):
        docker_run_args(WEB, "mesh-demo-app:k")


def test_a_word_that_would_need_quoting_is_refused() -> None:
    with pytest.raises(ValueError):
        render_unit(DemoInstance("web", "v1", 8080, "vm 1", "vm1", "vm"))
