"""How much life a certificate has left, and when that is too little: one threshold for `mesh ca check` and
`mesh status` (a deploy renews at half, so a certificate under a third means nobody deployed for a while).
Pure: bytes and a clock in, a verdict out; it must not read hosts or files.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from cryptography import x509

from mesh.errors import MeshError
from mesh.pki.certs import validity_start
from mesh.pki.leaf import load_chain

WARN_REMAINING = 1 / 3  # under this part of its lifetime left, a certificate is reported (exit 2)


class Expiry(Enum):
    """The state of one certificate on a host."""

    OK = "ok"
    LOW = "under 1/3 left"
    EXPIRED = "EXPIRED"
    MISSING = "missing"
    UNREADABLE = "unreadable"

    @property
    def bad(self) -> bool:
        return self is not Expiry.OK


@dataclass(frozen=True)
class Lifetime:
    """One certificate's validity seen at `now`; no times when it is missing or unreadable."""

    state: Expiry
    not_before: datetime | None = None
    not_after: datetime | None = None
    now: datetime | None = None

    @property
    def remaining(self) -> timedelta:
        if self.not_after is None or self.now is None:
            return timedelta(0)
        return max(self.not_after - self.now, timedelta(0))

    @property
    def fraction(self) -> float:
        """The part of the lifetime still ahead, 1.0 (new) to 0.0 (expired); the lifetime counted from the real
        start (not_before plus the backdate, as renewal counts it)."""
        if self.not_before is None or self.not_after is None or self.now is None:
            return 0.0
        total = (self.not_after - validity_start(self.not_before, self.not_after)).total_seconds()
        return 0.0 if total <= 0 else min(1.0, max(0.0, self.remaining.total_seconds() / total))

    def describe(self) -> str:
        """`2026-12-07 05:00 UTC, 23h 59m left (99%)`, or the state when there are no times."""
        if self.not_after is None:
            return self.state.value
        return (f"expires {self.not_after:%Y-%m-%d %H:%M} UTC, {remaining_text(self.remaining)} left "
                f"({self.fraction:.0%})")


def judge(cert: x509.Certificate, now: datetime) -> Lifetime:
    """The lifetime of cert at now: EXPIRED past not_after, LOW under WARN_REMAINING of it left, else OK."""
    return judge_times(cert.not_valid_before_utc, cert.not_valid_after_utc, now)


def judge_times(not_before: datetime, not_after: datetime, now: datetime) -> Lifetime:
    """judge() of a validity known only by its times (a record of an issued leaf)."""
    seen = Lifetime(Expiry.OK, not_before, not_after, now)
    if not_after <= now:
        return Lifetime(Expiry.EXPIRED, not_before, not_after, now)
    if seen.fraction < WARN_REMAINING:
        return Lifetime(Expiry.LOW, not_before, not_after, now)
    return seen


def judge_pem(pem: bytes | None, now: datetime | None = None) -> Lifetime:
    """The lifetime of the first certificate of a PEM file (a leaf, or leaf + chain); MISSING for None."""
    if pem is None:
        return Lifetime(Expiry.MISSING)
    try:
        first = load_chain(pem)[0]
    except MeshError:
        return Lifetime(Expiry.UNREADABLE)
    return judge(first, now or datetime.now(UTC))


def remaining_text(delta: timedelta) -> str:
    """Time left, coarse: `3649d 23h`, `11h 59m`, `4m 10s`; `0s` once past."""
    seconds = max(int(delta.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"
