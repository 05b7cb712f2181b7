"""`python -m mesh.controller --config /etc/mesh/controller/spec.json`: the controller as its systemd unit runs it
(JSON logs on stderr unless MESH_LOG_FORMAT says otherwise)."""

from __future__ import annotations

import argparse
import os
import sys

from mesh.controller.daemon import ControllerOptions, serve
from mesh.controller.spec import SPEC_PATH, load_spec
from mesh.errors import MeshError
from mesh.log import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.controller", description=__doc__)
    parser.add_argument("--config", default=SPEC_PATH, help=f"the spec a deploy wrote (default {SPEC_PATH})")
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("MESH_LOG_FORMAT", "json"))
    try:
        return serve(lambda: load_spec(args.config), ControllerOptions())
    except MeshError as exc:
        print(f"mesh controller: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
