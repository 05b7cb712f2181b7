"""Reads an OpenSSH known_hosts file the way mesh checks host keys with it: plain lines are trusted keys,
`@revoked` lines name keys no host may present, `@cert-authority` lines are refused (mesh does not check host
certificates). It owns reading and matching; it must not connect (ssh.py does).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
from dataclasses import dataclass

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"


@dataclass(frozen=True)
class MarkedLine:
    """A `@marker` line: where it is, the host patterns it names, and its key when paramiko can read it."""

    line: int
    marker: str
    patterns: tuple[str, ...]
    key: paramiko.PKey | None


@dataclass(frozen=True)
class KnownHosts:
    """One known_hosts file: trusted entries (revoked keys left out) and its `@` lines."""

    path: str
    entries: tuple[HostKeyEntry, ...]
    marked: tuple[MarkedLine, ...]

    def revoked_line(self, key: paramiko.PKey) -> int | None:
        """The line that revokes key (OpenSSH honours it for every host), or None."""
        for marked in self.marked:
            if marked.marker == REVOKED and marked.key is not None and _same_key(marked.key, key):
                return marked.line
        return None

    def refused_lines(self, address: str, port: int) -> list[MarkedLine]:
        """`@cert-authority` lines (or unknown markers) that apply to address:port."""
        return [marked for marked in self.marked
                if marked.marker != REVOKED and host_matches(marked.patterns, address, port)]

    def host_keys(self) -> paramiko.HostKeys:
        """The trusted keys as paramiko checks them."""
        keys = paramiko.HostKeys()
        for entry in self.entries:
            for name in entry.hostnames:
                keys.add(name, entry.key.get_name(), entry.key)
        return keys


def read_known_hosts(path: str) -> KnownHosts:
    """Parse path as OpenSSH does; lines paramiko cannot read (unknown key types) are skipped, as it does."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    entries: list[HostKeyEntry] = []
    marked: list[MarkedLine] = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            marker, _, rest = line.partition(" ")
            entry = _entry(rest.strip(), number)
            patterns = tuple(rest.split(None, 1)[0].split(",")) if rest.strip() else ()
            marked.append(MarkedLine(number, marker, patterns, entry.key if entry is not None else None))
        else:
            entry = _entry(line, number)
            if entry is not None:
                entries.append(entry)
    known = KnownHosts(path, (), tuple(marked))
    trusted = tuple(entry for entry in entries if known.revoked_line(entry.key) is None)
    return KnownHosts(path, trusted, tuple(marked))


def _entry(line: str, number: int) -> HostKeyEntry | None:
    try:
        return HostKeyEntry.from_line(line, number)
    except (paramiko.SSHException, InvalidHostKey, binascii.Error, ValueError, TypeError):
        return None


def _same_key(one: paramiko.PKey, other: paramiko.PKey) -> bool:
    return one.get_name() == other.get_name() and one.asbytes() == other.asbytes()


def host_matches(patterns: tuple[str, ...], address: str, port: int) -> bool:
    """OpenSSH's known_hosts matching: `*` and `?` wildcards, `!` negation (wins), `[host]:port` for a port
    other than 22, and hashed `|1|salt|hash` names."""
    name = address if port == 22 else f"[{address}]:{port}"
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        text = pattern[1:] if negated else pattern
        if _pattern_matches(text, name):
            if negated:
                return False
            matched = True
    return matched


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        parts = pattern.split("|")
        if len(parts) != 4:
            return False
        try:
            salt = base64.b64decode(parts[2])
        except (binascii.Error, ValueError):
            return False
        digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(base64.b64encode(digest).decode(), parts[3])
    return fnmatch.fnmatchcase(name.lower(), pattern.lower().replace("[", "[[]"))
