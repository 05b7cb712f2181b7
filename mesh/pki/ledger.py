"""`<state_dir>/ca/issued.json`: one record per leaf the CA signed (host, proxy, SPIFFE ID, serial, validity),
never a key. It owns that file's format and its locking; it must not sign or read certificates.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from mesh.errors import MeshError
from mesh.pki.files import PRIVATE_FILE, PUBLIC_FILE, write_atomic

LEDGER_FILE = "issued.json"
LOCK_FILE = ".issued.lock"
FORMAT = 1
# Records of leaves that expired longer ago than this are dropped when a new one is written.
KEEP_EXPIRED = timedelta(days=30)


@dataclass(frozen=True)
class IssuedRecord:
    """One leaf the CA signed: where it went and when it expires (times are UTC)."""

    host: str
    proxy: str
    spiffe_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime

    def as_json(self) -> dict[str, str]:
        return {key: value.isoformat() if isinstance(value, datetime) else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_json(cls, item: dict[str, str]) -> IssuedRecord:
        return cls(
            host=item["host"], proxy=item["proxy"], spiffe_id=item["spiffe_id"], serial=item["serial"],
            not_before=datetime.fromisoformat(item["not_before"]),
            not_after=datetime.fromisoformat(item["not_after"]),
            issued_at=datetime.fromisoformat(item["issued_at"]),
        )


def read_records(ca_dir: str) -> list[IssuedRecord]:
    """Every record of issued.json, oldest first; [] when nothing was issued yet."""
    path = os.path.join(ca_dir, LEDGER_FILE)
    try:
        with open(path, "rb") as handle:
            document = json.loads(handle.read())
        return [IssuedRecord.from_json(item) for item in document["issued"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as exc:
        raise MeshError(f"{path} is corrupt ({type(exc).__name__}: {exc})",
                        "restore it from a backup; it only lists issued leaves, so moving it away also works") from None


def append_record(ca_dir: str, record: IssuedRecord) -> None:
    """Add record to issued.json atomically; concurrent signers (threads or processes) wait their turn."""
    with _locked(ca_dir):
        kept = [old for old in read_records(ca_dir) if old.not_after > record.issued_at - KEEP_EXPIRED]
        document = {"format": FORMAT, "issued": [item.as_json() for item in [*kept, record]]}
        write_atomic(os.path.join(ca_dir, LEDGER_FILE), json.dumps(document, indent=2).encode() + b"\n",
                     PUBLIC_FILE)


@contextmanager
def _locked(ca_dir: str) -> Iterator[None]:
    # flock locks belong to the open file description, so two threads of one process exclude each other too.
    fd = os.open(os.path.join(ca_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
