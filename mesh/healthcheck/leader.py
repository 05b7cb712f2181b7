"""Leadership among health checkers: a Consul session with a TTL and the KV lock `mesh/<mesh_id>/health-checker/leader`.

It owns acquiring, renewing, fencing and releasing the lock; it must not probe or write health.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable

import consul
import structlog

from mesh.catalog import Consul, TokenRefused, check_token, connect

SESSION_NAME = "mesh-health-checker"
REFUSAL_LOG_EVERY = 30.0  # seconds between two log lines about the same refused token


def holder_id() -> str:
    """Who holds the lock, as written into the KV value: host name and PID."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Leadership:
    """One checker's claim on the lock. Call step() at least every ttl/3; holds() says whether to write.

    The session uses behavior=release and no lock-delay: a leader fences itself instead, so it stops writing
    once it has not renewed for a whole TTL, while Consul invalidates a session only after up to twice the
    TTL.
    """

    session_name = SESSION_NAME  # what Consul shows for the session (the controller's Leadership has its own)

    def __init__(self, consul_: Consul, key: str, ttl: int, holder: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.consul = consul_
        self.client = connect(consul_, timeout=max(2.0, ttl / 4))
        self.refusal_logged_at = float("-inf")
        self.key = key
        self.ttl = ttl
        self.holder = holder or holder_id()
        self.clock = clock
        self.session: str | None = None
        self.leading = False
        self.renewed_at = float("-inf")
        self.log = structlog.get_logger().bind(holder=self.holder)

    def step(self) -> bool:
        """Renew the session (creating one when needed) and try to take the lock when not holding it."""
        try:
            self._keep_session()
            if not self.leading:
                value = json.dumps({"holder": self.holder})
                self.leading = bool(self.client.kv.put(self.key, value, acquire=self.session))
                if self.leading:
                    self.log.info("leadership_acquired", key=self.key, session=self.session)
        except TokenRefused as exc:  # keep trying: the token may be created in Consul later
            if self.clock() - self.refusal_logged_at >= REFUSAL_LOG_EVERY:
                self.log.error("consul_token_refused", error=str(exc))
                self.refusal_logged_at = self.clock()
        except consul.ACLPermissionDenied as exc:  # e.g. the token was deleted: start over, checking it first
            self.log.warning("leadership_consul_denied", error=_first_line(exc))
            self.session, self.leading = None, False
        except (consul.ConsulException, OSError) as exc:
            self.log.warning("leadership_consul_error", error=_first_line(exc))
        return self.holds()

    def _keep_session(self) -> None:
        if self.session is not None:
            try:
                self.client.session.renew(self.session)
                self.renewed_at = self.clock()
                return
            except consul.NotFound:
                self.log.warning("leadership_session_lost", session=self.session, was_leading=self.leading)
                self.session, self.leading = None, False
        check_token(self.client, self.consul)  # a refused token would only be told as "permission denied"
        if self.refusal_logged_at > float("-inf"):
            self.log.info("consul_token_accepted")
            self.refusal_logged_at = float("-inf")
        self.session = self.client.session.create(name=self.session_name, ttl=self.ttl, lock_delay=0,
                                                  behavior="release")
        self.renewed_at = self.clock()

    def holds(self) -> bool:
        """Leading, and the session was renewed less than one TTL ago (else stop writing: it may be gone)."""
        if self.leading and self.clock() - self.renewed_at >= self.ttl:
            since = round(self.clock() - self.renewed_at, 1)
            self.log.warning("leadership_fenced", seconds_since_renewal=since)
            self.leading = False
        return self.leading

    def release(self) -> None:
        """Give the lock back and end the session, so a standby takes over at once; errors only logged."""
        if self.session is None:
            return
        try:
            if self.leading:
                self.client.kv.put(self.key, json.dumps({"holder": self.holder}), release=self.session)
                self.log.info("leadership_released", key=self.key)
            self.client.session.destroy(self.session)
        except (consul.ConsulException, OSError) as exc:
            self.log.warning("leadership_release_failed", error=_first_line(exc))
        finally:
            self.session, self.leading = None, False
            self.client.http.close()


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else repr(exc)
