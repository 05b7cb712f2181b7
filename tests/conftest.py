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
