"""Where mesh's templates and playbooks are, in a checkout, an editable install or an installed wheel.

They live at the repository root (`templates/`, `playbooks/`) and ship inside the package as `mesh/templates` and
`mesh/playbooks` (links to the root folders in the source tree, real folders in a wheel: pyproject.toml's
package-data). It owns finding them; it must not read or render them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


class PackageDataMissing(FileNotFoundError):
    """mesh is installed without its templates or playbooks (a broken or zipped install: a bug, not a user error)."""


def templates_dir() -> Path:
    """The folder of mesh's Jinja2 templates (`envoy/`, `systemd/`, `nftables/`, `containers/`)."""
    return _folder("templates")


def playbook_path(name: str) -> Path:
    """A playbook mesh ships, by file name: `playbook_path("deploy.yml")`."""
    path = _folder("playbooks") / name
    if not path.is_file():
        raise PackageDataMissing(f"mesh ships no playbook {name!r} (looked in {path.parent})")
    return path


def _folder(name: str) -> Path:
    found = resources.files("mesh") / name
    # Jinja2's FileSystemLoader and the playbook loader want real paths: an unpacked install gives one.
    path = Path(str(found))
    if not path.is_dir():
        raise PackageDataMissing(f"mesh's {name} are not at {path}: reinstall mesh (pip install . or a wheel)")
    return path
