"""Options and fixtures shared by every test folder.

`--update-goldens` rewrites golden files instead of comparing; without it they are only read.
"""

from __future__ import annotations

import os
import sys

import pytest

# The tools of mesh's own environment (mesh, ansible-inventory, envoy) come first on PATH, as if it were
# activated: `.venv/bin/pytest` works as well as `./test`.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite golden files with the current output instead of comparing")


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_root: runs real parts as root; as another user it fails, never skips")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked needs_root fails for another user: a skipped test would prove nothing (CI runs as root)."""
    marker = item.get_closest_marker("needs_root")
    if marker is not None and os.geteuid() != 0:
        pytest.fail(f"needs root ({marker.kwargs.get('reason', 'real parts')}): run the tests as root, as CI does",
                    pytrace=False)
