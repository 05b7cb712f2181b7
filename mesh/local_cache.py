"""Caches on the machine running mesh, apart from any state dir (a refused deploy writes nothing into its state
dir): Envoy's binary gzip-compressed and its sha256, the sidecar image tarball, a marker per proxy config the local
Envoy accepted. `$MESH_CACHE_DIR`, else `$XDG_CACHE_HOME/mesh`, else `~/.cache/mesh`. Everything in it is keyed by
content and may be deleted at any time.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str) -> Path:
    """The cache folder `name` (not created here)."""
    base = os.environ.get("MESH_CACHE_DIR")
    if base:
        return Path(base) / name
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mesh" / name
