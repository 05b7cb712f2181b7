"""The controller hosts' Python environment: the wheels mesh pushes, the commands that install them into
/opt/mesh/venv, and the checker's systemd unit. It builds and renders locally; it must not touch a host.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

from mesh import package_data
from mesh.errors import MeshError
from mesh.healthcheck.config import CHECKER_USER

MESH_ROOT = "/opt/mesh"
VENV = f"{MESH_ROOT}/venv"
WHEELS_DIR = f"{MESH_ROOT}/wheels"
MARKER_FILE = f"{VENV}/mesh-wheels.marker"
CHECKER_UNIT = "mesh-health-checker.service"
CONTROLLER_UNIT = "mesh-controller.service"
# What `python -m mesh.healthcheck` and `python -m mesh.controller` import beyond the standard library (their
# own dependencies follow). xds-protos: the span receiver decodes OTLP with the OpenTelemetry protos it ships
# (protobuf and grpcio come with it).
CHECKER_RUNTIME = ("py-consul", "structlog", "paramiko", "cryptography", "pyyaml", "jinja2", "prometheus-client",
                   "xds-protos")
# Imported in the installed venv before its marker is written: a wheel set that cannot run them is not recorded.
# The controller's imports the span receiver's decoding (mesh.traces.decode, the OpenTelemetry protos).
RUNTIME_MODULES = ("mesh.healthcheck.__main__", "mesh.controller.__main__", "mesh.traces.decode")
REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = package_data.templates_dir()
_NAME = re.compile(r"^[A-Za-z0-9._-]+")


class ControllerEnvError(MeshError):
    """The controller's wheels could not be built (pip failed, or mesh is not run from a checkout)."""


@dataclass(frozen=True)
class CheckerUnitContext:
    """templates/systemd/mesh-health-checker.service.j2."""

    python: str = f"{VENV}/bin/python3"
    config_dir: str = "/etc/mesh/checker"
    config_path: str = "/etc/mesh/checker/checker.json"
    user: str = CHECKER_USER  # a system user of its own, not root
    description: str = "mesh health checker (one active per mesh, through a Consul lock)"


@dataclass(frozen=True)
class ControllerUnitContext:
    """templates/systemd/mesh-controller.service.j2."""

    python: str = f"{VENV}/bin/python3"
    config_dir: str = "/etc/mesh/controller"
    config_path: str = "/etc/mesh/controller/spec.json"
    user: str = "mesh-controller"
    description: str = "mesh controller (one active per mesh, through a Consul lock): endpoints and certificates"


def runtime_pins(roots: Iterable[str] = CHECKER_RUNTIME) -> list[str]:
    """`name==version` for the checker's runtime and every dependency, as installed here (so the controller
    runs what the tests ran). Extras are left out; other markers are kept conservatively (a pin too many)."""
    pins: dict[str, str] = {}
    pending = list(roots)
    while pending:
        name = _canonical(pending.pop())
        if name in pins:
            continue
        try:
            pins[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a marker-only dependency of another Python (typing-extensions on 3.10)
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement and (match := _NAME.match(requirement)):
                pending.append(match.group(0))
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def source_digest(repo: Path = REPO_ROOT) -> str:
    """sha256 over mesh's package sources and pyproject.toml: what the mesh wheel is built from."""
    digest = hashlib.sha256()
    for path in [repo / "pyproject.toml", *sorted(_package_files(repo))]:
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _package_files(repo: Path) -> list[Path]:
    return [path for path in (repo / "mesh").rglob("*") if path.is_file() and "__pycache__" not in path.parts]


def wheels_key(repo: Path = REPO_ROOT) -> str:
    """The cache key of a wheel set: mesh's sources, the pinned runtime, this Python and machine."""
    parts = [source_digest(repo), *runtime_pins(), sys.implementation.cache_tag or "", platform.machine()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_wheels(cache_dir: Path, repo: Path = REPO_ROOT) -> list[Path]:
    """Build (once per key) the wheel of mesh itself and the checker's runtime, in cache_dir/wheels-KEY."""
    if not (repo / "pyproject.toml").is_file():
        raise ControllerEnvError(f"building the controller's wheels needs mesh's source tree; {repo} has no "
                                 "pyproject.toml", hint="run mesh from a checkout or an editable install")
    target = cache_dir / f"wheels-{wheels_key(repo)}"
    if not (target / ".complete").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="wheels-", dir=cache_dir) as work:
            staging = Path(work) / "out"
            _build_into(repo, Path(work), staging)
            (staging / ".complete").write_text("\n".join(runtime_pins()) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        for stale in cache_dir.glob("wheels-*"):
            if stale.is_dir() and stale != target and (stale / ".complete").is_file():
                shutil.rmtree(stale, ignore_errors=True)
    return sorted(target.glob("*.whl"))


def _build_into(repo: Path, work: Path, staging: Path) -> None:
    # Build from a copy of the sources: setuptools' build/ directory in the checkout can carry stale modules.
    source = work / "src"
    shutil.copytree(repo / "mesh", source / "mesh", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(repo / "pyproject.toml", source / "pyproject.toml")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--quiet", "--wheel-dir",
           str(staging)]
    constraints = work / "constraints.txt"
    constraints.write_text("\n".join(runtime_pins()) + "\n")
    _run([*pip, "--no-deps", str(source)], "building mesh's wheel")
    _run([*pip, "--constraint", str(constraints), *CHECKER_RUNTIME], "building the health checker's wheels")
    # Debian's python3 comes without ensurepip (python3-venv): the venv is made --without-pip and pip runs
    # from its own wheel, pushed with the others.
    _run([*pip, "--no-deps", f"pip=={importlib.metadata.version('pip')}"], "fetching pip's wheel")
    for wheel in staging.glob("*.whl"):
        _prefer_pure(wheel)


def _prefer_pure(wheel: Path) -> None:
    """Swap a compiled wheel (charset-normalizer's) for the same release's pure one when it exists, so the
    set installs on any controller Python rather than only on this one's version and machine."""
    if wheel.name.endswith("-none-any.whl"):
        return
    name, version = wheel.name.split("-")[:2]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--quiet", "--no-deps",
         "--only-binary=:all:", "--platform", "any", "--implementation", "py", "--python-version", python,
         "--dest", str(wheel.parent), f"{name}=={version}"],
        capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    if done.returncode == 0 and any(wheel.parent.glob(f"{name}-{version}-*none-any.whl")):
        wheel.unlink()


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ControllerEnvError(f"{what} failed (pip exited {done.returncode}): " + " | ".join(tail))


def wheel_set_marker(wheels: Sequence[Path]) -> str:
    """What the venv records once installed: sha256 over the wheels' names and contents."""
    digest = hashlib.sha256()
    for wheel in sorted(wheels, key=lambda path: path.name):
        digest.update(wheel.name.encode() + b"\0" + hashlib.sha256(wheel.read_bytes()).digest())
    return digest.hexdigest()[:32]


def installed_marker_command() -> str:
    """The fact: prints the installed wheel-set marker, or nothing when there is no venv yet."""
    return f"cat {MARKER_FILE} 2>/dev/null || true"


def install_commands(wheel_names: Sequence[str], marker: str, installed: str | None = None) -> list[str]:
    """Shell commands that create /opt/mesh/venv and install exactly these wheels (already pushed to
    /opt/mesh/wheels). Pure. Nothing to do when `installed` (the fact) equals `marker`; each command is also
    guarded, so running them twice changes nothing. The marker is written only after the checker imports."""
    if installed is not None and installed.strip() == marker:
        return []
    pip_wheels = [name for name in sorted(wheel_names) if name.startswith("pip-")]
    wheels = [f"{WHEELS_DIR}/{name}" for name in sorted(wheel_names) if name not in pip_wheels]
    python = f"{VENV}/bin/python3"
    quoted = " ".join(shlex.quote(wheel) for wheel in wheels)
    keep = " ".join(f"! -name {shlex.quote(name)}" for name in sorted(wheel_names))
    # pip runs from its pushed wheel (`python pip-X.whl/pip`) when there is one: hosts need no ensurepip.
    pip = f"{python} {WHEELS_DIR}/{pip_wheels[-1]}/pip" if pip_wheels else f"{python} -m pip"
    venv = f"python3 -m venv --without-pip {VENV}" if pip_wheels else f"python3 -m venv {VENV}"
    install = (f"{pip} install --quiet --disable-pip-version-check --no-index --no-deps "
               f"--force-reinstall --find-links {WHEELS_DIR} {quoted}")
    return [
        f"test -x {python} || {venv}",
        (f"test \"$(cat {MARKER_FILE} 2>/dev/null)\" = {shlex.quote(marker)} || "
         f"{{ {install} && {python} -c {shlex.quote(_imports())} && "
         f"echo {shlex.quote(marker)} > {MARKER_FILE}; }}"),
        f"find {WHEELS_DIR} -maxdepth 1 -name '*.whl' {keep} -delete",
    ]


def _imports() -> str:
    """The Python line importing every runtime module (a missing dependency fails it)."""
    return "import " + ", ".join(RUNTIME_MODULES)


def render_checker_unit(context: CheckerUnitContext | None = None,
                        templates_dir: Path = TEMPLATES_DIR) -> str:
    """The text of mesh-health-checker.service; refuses a template that does not render a unit."""
    return _render_unit(CHECKER_UNIT, asdict(context or CheckerUnitContext()), templates_dir)


def render_controller_unit(context: ControllerUnitContext | None = None,
                           templates_dir: Path = TEMPLATES_DIR) -> str:
    """The text of mesh-controller.service; refuses a template that does not render a unit."""
    return _render_unit(CONTROLLER_UNIT, asdict(context or ControllerUnitContext()), templates_dir)


def _render_unit(name: str, context: dict[str, object], templates_dir: Path) -> str:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir)),
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                     autoescape=False)
    text = environment.get_template(f"systemd/{name}.j2").render(context)
    sections = re.findall(r"^\[(\w+)\]$", text, flags=re.MULTILINE)
    if sections != ["Unit", "Service", "Install"]:
        raise ValueError(f"rendered {name} has sections {sections}, expected Unit, Service, Install")
    return text
