"""How the lab runs one demo app instance: its systemd unit on a VM, its `docker run` arguments on dock1.

Pure rendering from a DemoInstance; placing files and running commands on nodes belongs to the lab.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCRIPT_PATH = "/opt/mesh-demo/demoapp.py"
PYTHON = "/usr/bin/python3"
DOCKER_NETWORK = "mesh-demo"
IMAGE_REPOSITORY = "mesh-demo-app"
CONTAINER_MEMORY = "64m"
TCP_SERVICES = frozenset({"db"})
# What systemd's ExecStart= and the shell-less docker argv both take as one word with no quoting.
_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_.:/=@+,-]+$")


@dataclass(frozen=True)
class DemoInstance:
    """One running copy of the demo app: who it is, where it listens, whom it calls (name, host, port)."""

    service: str
    version: str
    port: int
    host: str
    instance: str
    kind: str  # "vm" or "container"
    upstreams: tuple[tuple[str, str, int], ...] = ()
    bind: str = "0.0.0.0"  # 127.0.0.1 for a spare: reachable only through a proxy once an inventory lists it

    @property
    def protocol(self) -> str:
        return "tcp" if self.service in TCP_SERVICES else "http"


def image_name(key: str) -> str:
    """The app image's name for a cache key (mesh.lab.images.app_image_key())."""
    return f"{IMAGE_REPOSITORY}:{key}"


def unit_name(instance: DemoInstance) -> str:
    return f"mesh-demo-{instance.service}.service"


def app_flags(instance: DemoInstance) -> list[str]:
    """demoapp.py's command-line flags for this instance."""
    flags = ["--service", instance.service, "--version", instance.version, "--port", str(instance.port),
             "--host", instance.host, "--instance", instance.instance, "--kind", instance.kind,
             "--protocol", instance.protocol]
    if instance.bind != "0.0.0.0":
        flags += ["--bind", instance.bind]
    for name, host, port in instance.upstreams:
        flags += ["--upstream", f"{name}={host}:{port}"]
    for word in flags:
        if not _PLAIN_WORD.fullmatch(word):
            raise ValueError(f"demo app flag {word!r} needs quoting; names and hosts are plain words")
    return flags


def render_unit(instance: DemoInstance) -> str:
    """The systemd unit text for a VM instance (installed as unit_name(instance))."""
    if instance.kind != "vm":
        raise ValueError(f"{instance.instance}: a systemd unit is for kind vm, not {instance.kind}")
    command = " ".join([PYTHON, SCRIPT_PATH, *app_flags(instance)])
    return (
        "[Unit]\n"
        f"Description=mesh demo app: {instance.service} {instance.version} on {instance.host}\n"
        "After=network.target\n"
        "\n"
        "[Service]\n"
        f"ExecStart={command}\n"
        "Restart=always\n"
        "RestartSec=1\n"
        "DynamicUser=yes\n"
        "NoNewPrivileges=yes\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def docker_run_args(instance: DemoInstance, image: str, network: str = DOCKER_NETWORK) -> list[str]:
    """`docker` arguments (starting with `run`) for a container instance; it publishes no port."""
    if instance.kind != "container":
        raise ValueError(f"{instance.instance}: docker run is for kind container, not {instance.kind}")
    return [
        "run", "--detach", "--name", instance.instance, "--hostname", instance.instance,
        "--network", network, "--restart", "always", "-m", CONTAINER_MEMORY,
        "--label", "mesh-lab=demo", "--label", f"mesh-demo.service={instance.service}",
        image, PYTHON, SCRIPT_PATH, *app_flags(instance),
    ]  # fmt: skip
