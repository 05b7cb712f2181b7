"""The pace of an xds proxy's last-known-good files: the snapshot its files on the host should carry.

A proxy on `mesh_delivery: xds` gets every change over its ADS stream at once; its resource files (what Envoy
starts from when no controller answers) only need to be fresh, not instant. So they are rewritten once the
proxy's snapshot has been quiet for FILES_QUIET_S, or at least every FILES_MAX_DELAY_S while it keeps changing.
A files proxy's files are its snapshot, always.

It owns which snapshot the leader's pusher sees for each proxy; it must not push, talk to Consul or render. Pure
but for the state it keeps between rounds (`FilesPace`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from mesh.config.xds import FILES_MAX_DELAY_S, FILES_QUIET_S
from mesh.controller.snapshot import ProxyKey, ProxySnapshot, Snapshot


@dataclass
class FilesPace:
    """Per xds proxy: the snapshot its files carry (last released), and when the newer one it lags first and
    last changed."""

    held: dict[ProxyKey, ProxySnapshot] = field(default_factory=dict)
    first_change: dict[ProxyKey, float] = field(default_factory=dict)
    last_change: dict[ProxyKey, float] = field(default_factory=dict)
    last_seen: dict[ProxyKey, str] = field(default_factory=dict)  # the version of the newest snapshot seen

    def paced(self, snapshot: Snapshot, xds: Collection[ProxyKey], now: float,
              quiet_s: float = FILES_QUIET_S, max_delay_s: float = FILES_MAX_DELAY_S) -> tuple[Snapshot, float | None]:
        """The snapshot the files should carry now, and when a held-back proxy is next due (None: none is).
        A proxy seen for the first time is released at once (its files are the deploy's until then)."""
        files: dict[ProxyKey, ProxySnapshot] = {}
        due: float | None = None
        for key, wanted in snapshot.items():
            if key not in xds:
                files[key] = wanted
                continue
            held = self.held.get(key)
            if held is None or held.version == wanted.version:
                self.held[key] = wanted
                self.first_change.pop(key, None)
                self.last_change.pop(key, None)
                self.last_seen[key] = wanted.version
                files[key] = wanted
                continue
            if self.last_seen.get(key) != wanted.version:
                self.last_seen[key] = wanted.version
                self.last_change[key] = now
                self.first_change.setdefault(key, now)
            release_at = min(self.last_change[key] + quiet_s, self.first_change[key] + max_delay_s)
            if now >= release_at:
                self.held[key] = wanted
                self.first_change.pop(key, None)
                self.last_change.pop(key, None)
                files[key] = wanted
                continue
            files[key] = held
            due = release_at if due is None else min(due, release_at)
        for key in set(self.held) - set(snapshot):
            self.forget(key)
        return files, due

    def forget(self, key: ProxyKey) -> None:
        for table in (self.held, self.first_change, self.last_change, self.last_seen):
            table.pop(key, None)
