"""Strict readers of single inventory values: ports, durations, booleans, names, URLs, addresses, SSH options.

Each takes a value and returns it typed or raises BadValue saying what was expected; none knows files or keys.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import unicodedata
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

# Every pattern is used with fullmatch: `$` also matches before a final newline, so "web\n" would pass re.match.
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}", re.ASCII)
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", re.ASCII)
_CONTAINER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}", re.ASCII)
# A duration's parts, largest unit first, each at most once: `1d`, `1h30m`, `1.5s`, `500ms`.
_DURATION_UNITS_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
_DURATION_PART = re.compile(r"(\d{1,12}(?:\.\d{1,9})?)(ms|d|h|m|s)", re.ASCII)
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?", re.ASCII)
# A managed host's inventory name lands in files run as root (scripts, units, nft rules, Envoy's config).
_HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}", re.ASCII)
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", re.ASCII)
# RFC 3986 pchar and '/', less what a shell or a quoted string would read: ' ( ) * $ (and no space, quote,
# backslash or control character); an optional query of the same characters and '?'.
_PATH_CHARS = r"(?:[A-Za-z0-9\-._~!&+,;=:@/]|%[0-9A-Fa-f]{2})"
_HEALTH_PATH = re.compile(rf"/{_PATH_CHARS}{{0,1023}}(?:\?(?:{_PATH_CHARS}|\?){{0,1023}})?", re.ASCII)
# What an http(s) URL may hold: RFC 3986's characters less quotes, parentheses, '*', '$' and '\'.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!&+,;=%]{1,2048}", re.ASCII)
# A host name that goes into firewall rules (nft, iptables) and root-run scripts: dot-separated labels of
# letters, digits and '-', no label starting or ending with '-'.
_SOURCE_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SOURCE_NAME = re.compile(rf"{_SOURCE_LABEL}(?:\.{_SOURCE_LABEL})*", re.ASCII)
_SCOPE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)
_JUMP_HOP = re.compile(r"(?:(?P<user>[^@]*)@)?(?P<host>\[[^\]]*\]|[^:@\[\]]*)(?::(?P<port>[^:]*))?")
MAX_PORT_DIGITS = 5
CERT_TTL_MIN = timedelta(minutes=1)  # controllers renew at half: 30 s, with a backdate of 6 s
CERT_TTL_MAX = timedelta(days=90)
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
        if not value.isascii() or not value.isdigit() or len(value) > MAX_PORT_DIGITS + 1:
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


def duration_millis(text: str, fractions: bool = True, largest: str = "d") -> float | None:
    """The milliseconds `text` writes as a duration with units, largest first, each once (`1d`, `1h30m`, `1.5s`,
    `500ms`); None when it is not one (or, without `fractions`, has a decimal point, or uses a unit larger than
    `largest`). The one grammar of every duration in an inventory."""
    order = tuple(_DURATION_UNITS_MS)
    first = order.index(largest)
    position, total, last = 0, 0.0, -1
    for match in _DURATION_PART.finditer(text):
        unit = order.index(match.group(2))
        if match.start() != position or unit <= last or unit < first or (not fractions and "." in match.group(1)):
            return None
        total += float(match.group(1)) * _DURATION_UNITS_MS[match.group(2)]
        position, last = match.end(), unit
    if position != len(text) or last < 0:
        return None
    return total


def parse_duration(value: Any) -> timedelta:
    """A positive duration written with whole numbers and units: `5s`, `500ms`, `90m`, `24h`, `1d`, or combined
    largest first (`1h30m`)."""
    expected = "a duration such as 5s, 500ms, 90m, 24h or 1d (units d, h, m, s, ms)"
    if not isinstance(value, str) or not value:
        raise BadValue(f"expected {expected}, got {describe(value)}")
    millis = duration_millis(value, fractions=False)
    if millis is None:
        raise BadValue(f"expected {expected}, got {describe(value)}")
    try:
        duration = timedelta(milliseconds=millis)
    except OverflowError:
        raise BadValue(f"expected {expected}, got {describe(value)}, far too long") from None
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


def parse_cert_ttl(value: Any) -> timedelta:
    """`mesh_cert_ttl`: a duration from CERT_TTL_MIN (a renewal at half-life must still have time to run)
    to CERT_TTL_MAX (a stolen key must not stay valid for long)."""
    duration = parse_duration(value)
    if not CERT_TTL_MIN <= duration <= CERT_TTL_MAX:
        raise BadValue(f"expected a certificate lifetime from 1m to 90d, got {value!r}")
    return duration


RENEW_FRACTION_MIN, RENEW_FRACTION_MAX = 0.1, 0.9


def parse_renew_fraction(value: Any) -> float:
    """`mesh_cert_renew_fraction`: how far into a leaf's lifetime the controller renews it, a number from 0.1
    (renew early and often) to 0.9 (little time left to retry a failed renewal); INI gives a string."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    written = isinstance(value, str) and re.fullmatch(r"\s*(0|1)?\.\d+\s*|\s*[01]\s*", value) is not None
    number = float(value) if numeric or written else None
    if number is None or not RENEW_FRACTION_MIN <= number <= RENEW_FRACTION_MAX:
        raise BadValue(f"expected a fraction of the certificate lifetime from {RENEW_FRACTION_MIN} to "
                       f"{RENEW_FRACTION_MAX} (e.g. 0.5), got {describe(value)}")
    return number


def check_string(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadValue(f"expected {what}, got {describe(value)}")
    return value


def has_control_characters(value: str) -> bool:
    """True when value holds a control character (NUL, CR, LF, tab, U+0085...), a line or paragraph separator
    (U+2028, U+2029) or an invisible format character (bidirectional overrides)."""
    return any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") for char in value)


def check_local_path(value: Any, what: str) -> str:
    """A path on the machine running mesh (a key file, the state folder): any characters a file name may
    have, `../` included, but no control characters or line separators."""
    check_string(value, what)
    if has_control_characters(value):
        raise BadValue(f"expected {what} with no control characters or line separators, got {describe(value)}")
    return str(value)


def check_host_name(value: Any) -> str:
    """The inventory name of a host mesh manages: letters, digits, '-', '_' and '.', at most 253, starting with
    a letter, digit or '_'. It is written into scripts, units, nft rules and Envoy's config on the hosts."""
    if not isinstance(value, str) or not _HOST_NAME.fullmatch(value) or ".." in value:
        raise BadValue(
            "a host mesh manages (one with workloads or in mesh_controllers) needs a name of letters, digits, "
            f"'-', '_' and '.' (at most 253, not starting with '-' or '.'), got {describe(value)}"
        )
    return value


def check_user_name(value: Any) -> str:
    """A POSIX user name: a letter or '_', then letters, digits, '_', '.', '-'; at most 32."""
    if not isinstance(value, str) or not _USER.fullmatch(value):
        raise BadValue(f"expected a user name (a letter or '_', then letters, digits, '_', '.', '-'; at most 32), "
                       f"got {describe(value)}")
    return value


def check_health_path(value: Any) -> str:
    """An HTTP health check path: '/', then URL path characters (RFC 3986's pchar less ' ( ) * $), perhaps a
    query; no `..` segment, no space, quote, backslash, control character or line separator."""
    if (not isinstance(value, str) or not _HEALTH_PATH.fullmatch(value)
            or ".." in value.split("?", 1)[0].split("/")):
        raise BadValue(
            "expected an HTTP path starting with '/', such as /healthz: letters, digits and - . _ ~ ! & + , ; = : "
            f"@ / %XX (a query after '?'), no '..' segment, got {describe(value)}"
        )
    return value


def check_dns_label(value: Any) -> str:
    """A service name: a DNS label, lower-case letters, digits and `-`, at most 63, no `-` at either end."""
    if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
        raise BadValue(
            f"expected a DNS label (a-z, 0-9 and '-', at most 63, not starting or ending with '-'), "
            f"got {describe(value)}"
        )
    return value


def check_version(value: Any) -> str:
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise BadValue(f"expected a version label such as 'v1' (letters, digits, '.', '_', '-'), got {describe(value)}")
    return value


def check_container_name(value: Any) -> str:
    if not isinstance(value, str) or not _CONTAINER.fullmatch(value):
        raise BadValue(f"expected a Docker container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*), got {describe(value)}")
    return value


def check_trust_domain(value: Any) -> str:
    """A SPIFFE trust domain: lower-case letters, digits, '.', '-' and '_'."""
    if (not isinstance(value, str) or not _TRUST_DOMAIN.fullmatch(value) or value.strip(".") != value
            or ".." in value):
        raise BadValue(f"expected a SPIFFE trust domain such as 'mesh.local' (a-z, 0-9, '.', '-', '_'), "
                       f"got {describe(value)}")
    return value


def check_url(value: Any) -> str:
    """An http or https URL with a host, such as http://10.77.0.2:8500."""
    expected = "an http(s) URL such as http://10.77.0.2:8500"
    if not isinstance(value, str):
        raise BadValue(f"expected {expected}, got {describe(value)}")
    if not _URL_CHARS.fullmatch(value):
        # urlsplit silently drops tabs and newlines: refuse them (and quotes, spaces...) before it runs.
        raise BadValue(f"expected {expected} (letters, digits and - . _ ~ : / ? # [ ] @ ! & + , ; = %), "
                       f"got {describe(value)}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise BadValue(f"expected {expected}, got {value!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or value != value.strip():
        raise BadValue(f"expected {expected}, got {value!r}")
    if port == 0:
        raise BadValue(f"expected {expected}, got {value!r} (port 0)")
    if ".." in parts.path.split("/"):
        raise BadValue(f"expected {expected} with no '..' in its path, got {value!r}")
    return value


def check_address(value: Any) -> str:
    """`ansible_host`: a host name or an IP address, with no port in it (that is `ansible_port`)."""
    if not isinstance(value, str) or not value.strip():
        raise BadValue(f"expected a host name or IP address, got {describe(value)}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        # ipaddress takes any text after '%' as an IPv6 scope, newlines included.
        scope = getattr(address, "scope_id", None)
        if scope is None or _SCOPE_ID.fullmatch(scope):
            return value
        raise BadValue(f"expected an IPv6 scope of letters, digits, '.', '_', '-' after '%', got {describe(value)}")
    if value.startswith("[") or re.fullmatch(r"[^:]+:\d+", value):
        raise BadValue(f"expected a host name or IP address with no port, got {value!r}; put the port in ansible_port")
    if not _HOSTNAME.fullmatch(value) or ".." in value:
        raise BadValue(f"expected a host name or IP address (letters, digits, '-', '_', '.'), got {describe(value)}")
    return value


def check_metrics_source(value: Any) -> str:
    """An address allowed to reach the metrics ports (a scraper's or a controller's): an IPv4 or IPv6 literal
    with no scope, or a host name of letters, digits, '-' and '.' (at most 253). It goes into nft rules and a
    script run as root, so nothing else (no space, quote, brace, comma, semicolon, '%' or '/') passes."""
    expected = "an IPv4 or IPv6 address, or a host name of letters, digits, '-' and '.'"
    if not isinstance(value, str):
        raise BadValue(f"expected {expected}, got {describe(value)}")
    if source_family(value) is None:
        raise BadValue(f"expected {expected} (no port, scope, space or punctuation), got {describe(value)}")
    return value


def source_family(value: str) -> str | None:
    """"ipv4", "ipv6" or "name" for a valid metrics source (see check_metrics_source), None otherwise."""
    if "%" in value or "/" in value:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        numeric = value.replace(".", "").isdigit()  # 10.0.0.300 is no host name: refuse what looks like an address
        return "name" if len(value) <= 253 and not numeric and _SOURCE_NAME.fullmatch(value) else None
    return "ipv4" if address.version == 4 else "ipv6"


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
    if has_control_characters(value.replace("\t", " ")):
        raise BadValue(f"expected ssh arguments on one line, with no control characters, got {describe(value)}")
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
    jump = options.get("ProxyJump")
    if jump is not None and jump.lower() == "none":
        jump = None  # ssh's way of saying: no jump host
    if jump is not None:
        parse_proxy_jump(jump)
    return SshOptions(known_hosts=options.get("UserKnownHostsFile"), proxy_jump=jump)


@dataclass(frozen=True)
class JumpHop:
    """One hop of ssh's ProxyJump: the host reached on the way (user None: the host's own user)."""

    host: str
    port: int = 22
    user: str | None = None


def parse_proxy_jump(value: str) -> tuple[JumpHop, ...]:
    """ssh's ProxyJump: hops `[user@]host[:port]` separated by ','; host a name or an address ([v6] with a port)."""
    expected = "ProxyJump as [user@]host[:port], hops separated by ','"
    hops: list[JumpHop] = []
    for hop in value.split(","):
        match = _JUMP_HOP.fullmatch(hop)
        if match is None or not match["host"]:
            raise BadValue(f"expected {expected}, got {value!r}")
        host = match["host"][1:-1] if match["host"].startswith("[") else match["host"]
        try:
            user = check_user_name(match["user"]) if match["user"] is not None else None
            port = parse_port(match["port"]) if match["port"] is not None else 22
            hops.append(JumpHop(check_address(host), port, user))
        except BadValue as exc:
            raise BadValue(f"expected {expected}, got {value!r}: {exc}") from None
    return tuple(hops)
