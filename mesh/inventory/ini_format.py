"""Reads Ansible's INI inventory format into InventoryData exactly as ansible-core 2.19 does, recording the
file, line and column of every group, host and variable. It must not reconcile the inventory or read other files.
"""

# Measured rules (see tests/unit/test_ini_format.py for the cases):
# - Lines are split as Python's str.splitlines() splits them, stripped; a line starting with '#' or ';' is skipped.
# - Host lines are split like shlex.split(line, comments=True): quotes are removed and '#' starts a comment even
#   inside a word; every value then goes through ast.literal_eval, falling back to the text.
# - `[group:vars]` lines are `key=value` split at the first '='; the value, stripped but with quotes and any
#   trailing comment kept, goes through ast.literal_eval too. Tuples and sets become lists; bytes become text.
# Everything Ansible refuses raises InventoryError; what it reads but almost surely not as meant is warned.

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import InventoryError, InventoryWarning, Origin
from mesh.inventory.data import InventoryData, UnsafeText, Var
from mesh.inventory.hostpattern import expand_host_pattern
from mesh.suggest import did_you_mean

VAULT_HEADER = "$ANSIBLE_VAULT"
SECTION_KINDS = ("hosts", "children", "vars")

_SECTION = re.compile(r"\[([^:\]\s]+)(?::(\w+))?\]\s*(?:#.*)?$")
_GROUP_NAME = re.compile(r"([^:\]\s]+)\s*(?:#.*)?$")
_UNSAFE_GROUP_CHARS = re.compile(r"^[\d\W]|[^\w]")
_LEADING_ZERO_PORT = re.compile(r":0[0-9]+$")
_HOST_WITH_PORT = re.compile(r"[^:\[\]]+:[0-9]+")
_SHLEX_SPACE = " \t\r\n"
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SHORT_DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,17})\Z")
# Line ends that str.splitlines() honours but an editor does not show as a new line.
_HIDDEN_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_JSON_KEY_TYPES = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Token:
    """One word of a host line, as shlex reads it, and where it starts (0-based)."""

    text: str
    column: int


@dataclass(frozen=True)
class HostLine:
    """A host line split into words; comment_in_word is where a '#' inside a word cut the line, if one did."""

    tokens: list[Token]
    comment_in_word: int | None


class UnreadableValue(Exception):
    """ast.literal_eval failed in a way Ansible does not recover from (it refuses the file)."""


def read_ini(text: str, path: str, data: InventoryData) -> None:
    """Add the groups, hosts and variables of one INI inventory to data (raises InventoryError)."""
    _refuse_unreadable(text, path)
    reader = _IniReader(path, data)
    for line_no, column, line in _physical_lines(text, path, data):
        reader.read_line(line, line_no, column)
    reader.finish()


def split_host_line(line: str) -> HostLine:
    """Words of a host line exactly as shlex.split(line, comments=True) gives them; ValueError as shlex does."""
    tokens: list[Token] = []
    chars: list[str] = []
    state, start, index, comment_at = " ", 0, 0, None
    while index < len(line):
        char = line[index]
        if state in "'\"":
            index = _quoted_char(line, index, state, chars)
            if index < 0:
                state, index = "a", -index
            continue
        if char in _SHLEX_SPACE or char == "#":
            if state == "a":
                tokens.append(Token("".join(chars), start))
                comment_at = index if char == "#" else None
            state, index = " ", index + 1
            if char == "#":
                break
            continue
        if state == " ":
            state, start, chars = "a", index, []
        if char in "'\"":
            state, index = char, index + 1
        elif char == "\\":
            if index + 1 >= len(line):
                raise ValueError("No escaped character")
            chars.append(line[index + 1])
            index += 2
        else:
            chars.append(char)
            index += 1
    if state in "'\"":
        raise ValueError("No closing quotation")
    if state == "a":
        tokens.append(Token("".join(chars), start))
    return HostLine(tokens, comment_at)


def _quoted_char(line: str, index: int, quote: str, chars: list[str]) -> int:
    """Consume one character inside quotes; the next index, negated when the quote closed."""
    char = line[index]
    if char == quote:
        return -(index + 1)
    if char == "\\" and quote == '"':
        if index + 1 >= len(line):
            raise ValueError("No escaped character")
        following = line[index + 1]
        if following not in '\\"':
            chars.append("\\")
        chars.append(following)
        return index + 2
    chars.append(char)
    return index + 1


def ini_value(text: str) -> Any:
    """The value Ansible makes of an INI value's text: a Python literal when it is one, else the text."""
    # Fast paths with literal_eval's own answers: a plain name is never a literal, a short decimal is an int.
    if _PLAIN_NAME.match(text) and text not in ("True", "False", "None"):
        return text
    if _SHORT_DECIMAL.match(text):
        return int(text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    except TypeError as error:
        raise UnreadableValue(str(error)) from None
    except (RecursionError, MemoryError):
        raise UnreadableValue("it is nested too deeply") from None
    return _plain(value)


def _plain(value: Any) -> Any:
    """Tuples and sets as lists, bytes as text, complex numbers and '...' as their text (as Ansible does)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        bad = [key for key in value if not isinstance(key, _JSON_KEY_TYPES)]
        if bad:
            raise UnreadableValue(f"a dictionary key must be a string or a number, not {bad[0]!r}")
        return {key: _plain(item) for key, item in value.items()}
    if value is Ellipsis:
        return "..."
    if isinstance(value, complex):
        return str(value)
    if isinstance(value, bytes):
        return UnsafeText(value.decode("utf-8", "surrogateescape"))
    return value


def _refuse_unreadable(text: str, path: str) -> None:
    if text.startswith(VAULT_HEADER):
        raise InventoryError(Origin(path, 1, 1), "the file is encrypted with Ansible Vault",
                             hint="mesh cannot decrypt vault files yet; decrypt it or use plain variables")
    if text.startswith("\ufeff"):
        raise InventoryError(Origin(path, 1, 1), "the file starts with a byte order mark (BOM)",
                             hint="Ansible reads the BOM as part of the first line; save the file as UTF-8 without BOM")


def _physical_lines(text: str, path: str, data: InventoryData) -> list[tuple[int, int, str]]:
    """(editor line, column offset, text) of each line Ansible sees; warns where it breaks an editor line."""
    lines: list[tuple[int, int, str]] = []
    line_no, offset = 1, 0
    for chunk in text.splitlines(keepends=True):
        ending = "\r\n" if chunk.endswith("\r\n") else chunk[-1] if chunk[-1] in "\n\r" + _HIDDEN_BREAKS else ""
        body = chunk[: len(chunk) - len(ending)]
        lines.append((line_no, offset, body))
        if ending and ending[0] in _HIDDEN_BREAKS:
            data.warn(InventoryWarning(
                Origin(path, line_no, offset + len(body) + 1),
                f"Ansible ends the line at the invisible character U+{ord(ending[0]):04X}; "
                "what follows is read as a new line"))
            offset += len(chunk)
        else:
            line_no, offset = line_no + 1, 0
    return lines


@dataclass
class _Pending:
    """A group named before it is defined: by `[g:vars]` or as a child in `[p:children]`."""

    kind: str
    origin: Origin
    parents: list[str] = field(default_factory=list)


@dataclass
class _IniReader:
    """The state of one pass over one file: the current section and the groups still to be defined."""

    path: str
    data: InventoryData
    group: str = "ungrouped"
    kind: str = "hosts"
    pending: dict[str, _Pending] = field(default_factory=dict)

    def read_line(self, raw: str, line_no: int, offset: int) -> None:
        line = raw.strip()
        if not line or line[0] in "#;":
            return
        column = offset + len(raw) - len(raw.lstrip()) + 1
        origin = Origin(self.path, line_no, column)
        section = _SECTION.match(line)
        if section:
            self._section(section.group(1), section.group(2), line, origin)
        elif line.startswith("[") and line.endswith("]"):
            raise InventoryError(origin, f"invalid section header {_short(line)}", key=line,
                                 hint="write [group], [group:vars] or [group:children], with no spaces")
        elif self.kind == "hosts":
            _HostLineReader(self, origin).read(line)
        elif self.kind == "vars":
            self._variable(line, origin)
        else:
            self._child(line, origin)

    def _section(self, group: str, kind: str | None, line: str, origin: Origin) -> None:
        kind = kind or "hosts"
        if kind not in SECTION_KINDS:
            raise InventoryError(origin, f"unknown section type ':{kind}' in {line}", key=line,
                                 hint=did_you_mean(kind, SECTION_KINDS) or "expected :vars or :children")
        if _UNSAFE_GROUP_CHARS.search(group):
            self.data.warn(InventoryWarning(
                origin, "a group name should be a valid variable name (letters, digits, '_'; not starting "
                "with a digit); Ansible keeps it but warns", key=group))
        if group not in self.data.groups:
            if kind == "vars" and group not in self.pending:
                self.pending[group] = _Pending("vars", origin)
            self.data.add_group(group, origin)
        waiting = self.pending.get(group)
        if waiting is not None and kind != "vars":
            if waiting.kind == "children":
                self._resolve_children(group)
            else:
                del self.pending[group]
        self.group, self.kind = group, kind

    def _resolve_children(self, group: str) -> None:
        waiting = self.pending.pop(group)
        for parent in waiting.parents:
            self._add_child(parent, group, waiting.origin)

    def _variable(self, line: str, origin: Origin) -> None:
        if "=" not in line:
            raise InventoryError(origin, f"expected key=value in [{self.group}:vars], got {_short(line)}", key=line)
        key_text, value_text = line.split("=", 1)
        key, value_text = key_text.strip(), value_text.strip()
        value = self.value(value_text, origin, key)
        _warn_vars_comment(self.data, value, value_text, origin, key)
        self.note_assignment(self.data.groups[self.group].vars, key, value, origin)
        self.data.set_group_var(self.group, key, Var(value, origin))

    def _child(self, line: str, origin: Origin) -> None:
        match = _GROUP_NAME.match(line)
        if not match:
            raise InventoryError(origin, f"expected one group name in [{self.group}:children], got {_short(line)}",
                                 key=line, hint="one group per line; a comment starts with '#'")
        child = match.group(1)
        if child not in self.data.groups:
            waiting = self.pending.setdefault(child, _Pending("children", origin))
            waiting.parents.append(self.group)
            waiting.origin = origin
        else:
            self._add_child(self.group, child, origin)

    def _add_child(self, parent: str, child: str, origin: Origin) -> None:
        if child == "all":
            raise InventoryError(origin, "'all' holds every group and cannot be a child", key=child)
        self.data.add_child(parent, child, origin)

    def value(self, text: str, origin: Origin, key: str) -> Any:
        """The typed value of text, refused clearly where Ansible refuses the file."""
        if text.startswith(VAULT_HEADER):
            raise InventoryError(origin, "vault-encrypted values cannot be read by mesh yet", key=key)
        try:
            value = ini_value(text)
        except UnreadableValue as error:
            raise InventoryError(origin, f"Ansible cannot read the value {_short(text)}: {error}", key=key,
                                 hint="quote the whole value to keep it as text") from None
        _warn_value(self.data, value, text, origin, key)
        return value

    def note_assignment(self, owner_vars: dict[str, Var], key: str, value: Any, origin: Origin) -> None:
        """Warn about a key Ansible only deprecates, and about a value that silently replaces another."""
        if not key.isidentifier() or not key.isascii():
            self.data.warn(InventoryWarning(origin, "not a valid variable name; Ansible accepts it with a "
                                            "deprecation warning", key=key))
        earlier = owner_vars.get(key)
        if earlier is not None and earlier.origin.file == self.path and earlier.value != value:
            self.data.warn(InventoryWarning(origin, f"{key} was already set to {_short(repr(earlier.value))} at "
                                            f"{earlier.origin}; this later value wins", key=key))

    def finish(self) -> None:
        for name, waiting in self.pending.items():
            hint = did_you_mean(name, (group for group in self.data.groups if group != name))
            if waiting.kind == "vars":
                raise InventoryError(waiting.origin, f"[{name}:vars] is given, but group {name!r} is never "
                                     "defined", key=name, hint=hint or f"add a [{name}] section")
            raise InventoryError(waiting.origin, f"[{waiting.parents[-1]}:children] names group {name!r}, "
                                 "which is never defined", key=name,
                                 hint=hint or f"add a [{name}] section (it may be empty)")


@dataclass
class _HostLineReader:
    """One host line: `pattern key=value ...`."""

    file: _IniReader
    origin: Origin

    def at(self, column: int) -> Origin:
        return Origin(self.origin.file, self.origin.line, (self.origin.column or 1) + column)

    def read(self, line: str) -> None:
        try:
            split = split_host_line(line)
        except ValueError as error:
            raise InventoryError(self.origin, f"cannot split the host line: {error}", key=line,
                                 hint="check the quotes and a trailing backslash") from None
        pattern = split.tokens[0]
        hosts, port = self._hosts(pattern, line)
        variables = [self._variable(token) for token in split.tokens[1:]]
        if split.comment_in_word is not None:
            self.file.data.warn(InventoryWarning(
                self.at(split.comment_in_word), "'#' inside a word starts a comment: the rest of the line is "
                "dropped", key=split.tokens[-1].text))
        if not hosts:
            self.file.data.warn(InventoryWarning(self.origin, "the host range stands for no host at all",
                                                 key=pattern.text))
        self._populate(hosts, port, pattern, variables)

    def _hosts(self, token: Token, line: str) -> tuple[list[str], int | None]:
        origin = self.at(token.column)
        try:
            hosts, port = expand_host_pattern(token.text, origin)
        except InventoryError:
            if line.startswith("[") and "]" in line:
                raise InventoryError(origin, f"{_short(line)} is neither a section header nor a host", key=line,
                                     hint="a comment after a section header starts with '#'") from None
            raise
        if token.text.strip().endswith(":") and port is None:
            raise InventoryError(origin, "a host pattern cannot end with ':' (it introduces a port)",
                                 key=token.text, hint="write host:PORT or drop the ':'")
        for host in hosts:
            if host.strip() == "---":
                raise InventoryError(origin, "'---' is not a host: this looks like a YAML file", key=host,
                                     hint="name the file .yml or .yaml")
            if not host:
                raise InventoryError(origin, "the host name is empty", key=token.text)
            if any(char.isspace() for char in host):
                self.file.data.warn(InventoryWarning(origin, "the host name contains a space character",
                                                     key=host))
        if port is not None:
            self._warn_port(token.text, port, origin)
        return hosts, port

    def _warn_port(self, pattern: str, port: int, origin: Origin) -> None:
        if port == 0:
            self.file.data.warn(InventoryWarning(origin, "Ansible ignores port 0 in a host pattern", key=pattern))
        elif _LEADING_ZERO_PORT.search(pattern):
            self.file.data.warn(InventoryWarning(origin, f"the port is written with a leading zero; Ansible "
                                                 f"reads it as {port}", key=pattern))

    def _variable(self, token: Token) -> tuple[str, Any, Origin]:
        origin = self.at(token.column)
        if "=" not in token.text:
            raise InventoryError(origin, f"expected key=value after the host name, got {_short(token.text)}",
                                 key=token.text, hint="quote a value that contains spaces: key=\"a b\"")
        key, text = token.text.split("=", 1)
        return key, self.file.value(text, origin, key), origin

    def _populate(self, hosts: list[str], port: int | None, pattern: Token,
                  variables: list[tuple[str, Any, Origin]]) -> None:
        data = self.file.data
        origin = self.at(pattern.column)
        for index, host in enumerate(hosts):
            known = data.hosts.get(host)
            data.add_host(host, origin, self.file.group)
            if port and known is None:
                data.set_host_var(host, "ansible_port", Var(port, origin))
            elif port and index == 0:
                data.warn(InventoryWarning(origin, f"Ansible ignores this port: {host} was already defined at "
                                           f"{known.origin if known else '?'}", key=pattern.text))
            for key, value, where in variables:
                if index == 0:
                    self.file.note_assignment(data.hosts[host].vars, key, value, where)
                data.set_host_var(host, key, Var(value, where))


def _warn_value(data: InventoryData, value: Any, text: str, origin: Origin, key: str) -> None:
    """Values Ansible reads, but almost surely not as the author meant."""
    if key == "ansible_port" and isinstance(value, str) and len(value) > 1 and value.isdigit() \
            and value[0] == "0":
        data.warn(InventoryWarning(origin, f"Ansible keeps {value!r} as text (a leading zero is not a number "
                                   "in INI); write the port without the zero", key=key))
    elif key == "ansible_host" and isinstance(value, str) and _HOST_WITH_PORT.fullmatch(value):
        data.warn(InventoryWarning(origin, "ansible_host should not hold a port; set ansible_port", key=key))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) != text.strip():
        data.warn(InventoryWarning(origin, f"{text.strip()!r} is read as the number {value!r}; quote it to keep "
                                   "the text", key=key))
    stripped = text.strip()
    if stripped.startswith("{") and not stripped.startswith("{{") and isinstance(value, list):
        data.warn(InventoryWarning(origin, "a set literal becomes a list in no fixed order", key=key))
    if ("b'" in text or 'b"' in text) and _has_bytes_literal(text):
        data.warn(InventoryWarning(origin, "a bytes literal is read as text that Ansible marks unsafe "
                                   "(never templated)", key=key))


def _short(text: str, limit: int = 60) -> str:
    """text quoted for a message, cut to limit characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _has_bytes_literal(text: str) -> bool:
    try:
        tree = ast.parse(text.lstrip(" \t"), mode="eval")
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.Constant) and isinstance(node.value, bytes) for node in ast.walk(tree))


def _warn_vars_comment(data: InventoryData, value: Any, text: str, origin: Origin, key: str) -> None:
    if isinstance(value, str) and re.search(r"\s[#;]", text):
        data.warn(InventoryWarning(origin, "in a :vars section a trailing comment is part of the value",
                                   key=key))
