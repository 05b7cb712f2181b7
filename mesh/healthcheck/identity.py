"""The checker's client identity: its TLS context, rebuilt in place when its certificate changes on disk.

A deploy or a controller renews the checker's leaf by swapping the `tls` link to a new folder (down to every
30 s with a one-minute mesh_cert_ttl); the checker notices with one stat per round and never restarts. It
owns when to reload; how the context is made is probe.client_context's.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

import structlog

from mesh.healthcheck.probe import client_context

# what identifies the files a context was made from: each file's resolved path, inode, size and mtime
Seen = tuple[tuple[str, int, int, int], ...]
ContextMaker = Callable[[str, str, str], ssl.SSLContext]


def files_seen(paths: tuple[str, ...]) -> Seen:
    """Each path resolved through its links (the `tls` link's target changes on renewal) with its inode, size
    and mtime; a missing file is (path, -1, -1, -1)."""
    seen = []
    for path in paths:
        real = os.path.realpath(path)
        try:
            info = os.stat(real)
        except OSError:
            seen.append((real, -1, -1, -1))
        else:
            seen.append((real, info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(seen)


class ClientIdentity:
    """The checker's TLS context; `refresh()` (once per round) rebuilds it when the certificate, key or CA
    changed. A change it cannot load (a renewal half done) keeps the last good context and is retried."""

    def __init__(self, cert: str, key: str, ca: str, make: ContextMaker = client_context) -> None:
        self.paths = (cert, key, ca)
        self.make = make
        self.seen = files_seen(self.paths)
        self.context = self._load()  # the first load fails loudly: the checker cannot probe without it
        self.log = structlog.get_logger()

    def _load(self) -> ssl.SSLContext:
        cert, key, ca = (real for real, *_ in self.seen)  # the resolved files: one renewal, not two halves
        return self.make(cert, key, ca)

    def refresh(self) -> bool:
        """Rebuild the context if the files changed since it was made; True when it was rebuilt."""
        seen = files_seen(self.paths)
        if seen == self.seen:
            return False
        previous = self.seen
        self.seen = seen
        try:
            self.context = self._load()
        except (OSError, ssl.SSLError) as exc:  # names files, never their content
            self.seen = previous  # try again next round
            self.log.warning("checker_certificate_reload_failed", cert=seen[0][0], error=str(exc))
            return False
        self.log.info("checker_certificate_reloaded", cert=seen[0][0])
        return True
