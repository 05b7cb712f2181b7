"""Strict readers of single inventory values: ports, durations, booleans, names, URLs, addresses, SSH options.

Each takes a value and returns it typed or raises BadValue saying what was expected; none knows files or keys.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_VERSION = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62})$")
_CONTAINER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
# Ansible's boolean(): what `ansible_become: yes` and INI's "true" mean.
_TRUE = {"y", "yes", "on", "1", "true", "t"}
_FALSE = {"n", "no", "off", "0", "false", "f"}

# ssh -o options mesh honours, and those that only tune a connection and change nothing about who is reached.
HONOURED_SSH_OPTIONS = ("UserKnownHostsFile", "ProxyJump", "StrictHostKeyChecking")
HARMLESS_SSH_OPTIONS = (
    "ControlMaster", "ControlPersist", "ControlPath", "ServerAliveInterval", "ServerAliveCountMax",
    "ConnectTimeout", "Compression", "TCPKeepAlive",
)


class BadValue(ValueError):
    """A value that is not what the contract expects; the message says what was expected."""


def describe(value: Any) -> str:
    """A short description of a value for messages: its repr and, for surprises, its type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})" if not isinstance(value, str) else text


def parse_port(value: Any) -> int:
    """An integer 1-65535, or a string of its digits with no leading zero (INI gives strings)."""
    expected = "a port: an integer 1-65535 or a string of its digits, no leading zero"
    if isinstance(value, bool):
        raise BadValue(f"expected {expected}, got {describe(value)}")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit():
            raise BadValue(f"expected {expected}, got {describe(value)}")
        if len(value) > 1 and value.startswith("0"):
            raise BadValue(f"expected {expected}, got {value!r} with a leading zero")
        number = int(value)
    elif isinstance(value, int):
        number = value
    else:
        raise BadValue(f"expected {expected}, got {describe(value)}")
    if not 1 <= number <= 65535:
        raise BadValue(f"expected {expected}, got {number}, out of range")
    return number


def parse_duration(value: Any) -> timedelta:
    """A positive duration written with units: `5s`, `90m`, `24h`, `1d`, or combined in that order (`1h30m`)."""
    expected = "a duration such as 5s, 90m, 24h or 1d (units d, h, m, s)"
    if not isinstance(value, str) or not value:
        raise BadValue(f"expected {expected}, got {describe(value)}")
    match = _DURATION.match(value)
    if match is None or not any(match.groups()):
        raise BadValue(f"expected {expected}, got {value!r}")
    days, hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if duration <= timedelta(0):
        raise BadValue(f"expected a duration longer than zero, got {value!r}")
    return duration


def parse_bool(value: Any) -> bool:
    """A boolean as Ansible reads one: true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise BadValue(f"expected a boolean (true/false, yes/no), got {describe(value)}")


def check_string(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadValue(f"expected {what}, got {describe(value)}")
    return value


def check_dns_label(value: Any) -> str:
    """A service name: a DNS label, lower-case letters, digits and `-`, at most 63, no `-` at either end."""
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        raise BadValue(
            f"expected a DNS label (a-z, 0-9 and '-', at most 63, not starting or ending with '-'), "
            f"got {describe(value)}"
        )
    return value


def check_version(value: Any) -> str:
    if not isinstance(value, str) or not _VERSION.match(value):
        raise BadValue(f"expected a version label such as 'v1' (letters, digits, '.', '_', '-'), got {describe(value)}")
    return value


def check_container_name(value: Any) -> str:
    if not isinstance(value, str) or not _CONTAINER.match(value):
        raise BadValue(f"expected a Docker container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*), got {describe(value)}")
    return value


def check_trust_domain(value: Any) -> str:
    """A SPIFFE trust domain: lower-case letters, digits, '.', '-' and '_'."""
    if not isinstance(value, str) or not _TRUST_DOMAIN.match(value) or value.strip(".") != value:
        raise BadValue(f"expected a SPIFFE trust domain such as 'mesh.local' (a-z, 0-9, '.', '-', '_'), "
                       f"got {describe(value)}")
    return value


def check_url(value: Any) -> str:
    """An http or https URL with a host, such as http://10.77.0.2:8500."""
    expected = "an http(s) URL such as http://10.77.0.2:8500"
    if not isinstance(value, str):
        raise BadValue(f"expected {expected}, got {describe(value)}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise BadValue(f"expected {expected}, got {value!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or value != value.strip():
        raise BadValue(f"expected {expected}, got {value!r}")
    if port == 0:
        raise BadValue(f"expected {expected}, got {value!r} (port 0)")
    return value


def check_address(value: Any) -> str:
    """`ansible_host`: a host name or an IP address, with no port in it (that is `ansible_port`)."""
    if not isinstance(value, str) or not value.strip():
        raise BadValue(f"expected a host name or IP address, got {describe(value)}")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if value.startswith("[") or re.match(r"^[^:]+:\d+$", value):
        raise BadValue(f"expected a host name or IP address with no port, got {value!r}; put the port in ansible_port")
    if not _HOSTNAME.match(value) or ".." in value:
        raise BadValue(f"expected a host name or IP address, got {value!r}")
    return value


@dataclass(frozen=True)
class SshOptions:
    """What mesh takes from `ansible_ssh_common_args` / `ansible_ssh_extra_args`."""

    known_hosts: str | None = None
    proxy_jump: str | None = None


def parse_ssh_args(value: Any) -> SshOptions:
    """Read ssh's `-o Key=Value` (and `-J host`) options; refuse those that change how a host is reached."""
    if value is None or value == "":
        return SshOptions()
    if not isinstance(value, str):
        raise BadValue(f"expected ssh arguments as one string, got {describe(value)}")
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise BadValue(f"the ssh arguments cannot be split like a shell would: {exc}") from None
    options: dict[str, str] = {}
    position = 0
    while position < len(words):
        word = words[position]
        if word in ("-o", "-J") and position + 1 < len(words):
            option = words[position + 1] if word == "-o" else f"ProxyJump={words[position + 1]}"
            position += 2
        elif word.startswith("-o") and len(word) > 2:
            option, position = word[2:], position + 1
        else:
            raise BadValue(
                f"mesh reads only `-o Option=value` here ({', '.join(HONOURED_SSH_OPTIONS)}), got {word!r}"
            )
        name, _, setting = option.partition("=") if "=" in option else option.partition(" ")
        options[_canonical_option(name)] = setting.strip()
    return _ssh_options(options)


def _canonical_option(name: str) -> str:
    for known in HONOURED_SSH_OPTIONS + HARMLESS_SSH_OPTIONS:
        if known.lower() == name.lower():
            return known
    raise BadValue(
        f"the ssh option {name!r} changes how the host is reached and mesh does not support it; "
        f"supported: {', '.join(HONOURED_SSH_OPTIONS)}"
    )


def _ssh_options(options: dict[str, str]) -> SshOptions:
    strict = options.get("StrictHostKeyChecking")
    if strict is not None and strict.lower() != "yes":
        raise BadValue(f"mesh always checks host keys: StrictHostKeyChecking must be yes, got {strict!r}")
    for name in ("UserKnownHostsFile", "ProxyJump"):
        if name in options and not options[name]:
            raise BadValue(f"the ssh option {name} needs a value")
    return SshOptions(known_hosts=options.get("UserKnownHostsFile"), proxy_jump=options.get("ProxyJump"))
