"""`python -m mesh.controller --config /etc/mesh/controller/spec.json`: the controller as its systemd unit runs it
(JSON logs on stderr unless MESH_LOG_FORMAT says otherwise)."""

from __future__ import annotations

import argparse
import os
import sys

from mesh.config import paths
from mesh.controller.daemon import ControllerOptions, serve
from mesh.controller.spec import CA_DIR, SPEC_PATH, SSH_KEY, load_spec
from mesh.errors import MeshError
from mesh.log import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.controller", description=__doc__)
    parser.add_argument("--config", default=SPEC_PATH, help=f"the spec a deploy wrote (default {SPEC_PATH})")
    parser.add_argument("--ssh-key", default=SSH_KEY, help=f"the key mesh-ctl accepts (default {SSH_KEY})")
    parser.add_argument("--ca-dir", default=CA_DIR,
                        help=f"root.pem, intermediate.pem and intermediate.key (default {CA_DIR})")
    parser.add_argument("--envoy", default=paths.ENVOY_BINARY,
                        help=f"the Envoy validating bundles (default {paths.ENVOY_BINARY})")
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("MESH_LOG_FORMAT", "json"))
    options = ControllerOptions(key_path=args.ssh_key, intermediate_cert=os.path.join(args.ca_dir, "intermediate.pem"),
                                intermediate_key=os.path.join(args.ca_dir, "intermediate.key"),
                                root_cert=os.path.join(args.ca_dir, "root.pem"), envoy=args.envoy)
    try:
        return serve(lambda: load_spec(args.config), options)
    except MeshError as exc:
        print(f"mesh controller: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
