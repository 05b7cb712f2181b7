"""Reads one YAML or JSON file as Ansible does (YAML 1.1 through PyYAML, JSON first when it parses), keeping
the file, line and column of every key and value. Bounded: oversized files and alias bombs are refused.

It owns reading bytes into data; it must not know what an inventory or a variable file means.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mesh.errors import InventoryError, InventoryWarning, Origin
from mesh.inventory.data import UnsafeText

MAX_FILE_BYTES = 64 * 1024 * 1024
# Values after alias expansion: what a reader of the data (and `inventory list`) would have to walk.
MAX_EXPANDED_NODES = 5_000_000
MAX_DEPTH = 200

VAULT_HEADER = "$ANSIBLE_VAULT;"


@dataclass(slots=True)
class Marks:
    """Positions of one value and, for mappings and sequences, of what it holds."""

    origin: Origin
    items: dict[Any, Marks] | list[Marks] | None = None
    key_origins: dict[Any, Origin] | None = None
    # The text of an integer as written: YAML 1.1 reads `022` as 18 and `1:30` as 90, a reader may warn.
    raw: str | None = None

    def at(self, *path: Any) -> Marks:
        """The marks of the value at path (keys and indexes); the nearest known enclosing value if absent."""
        marks = self
        for step in path:
            child: Marks | None = None
            if isinstance(marks.items, dict):
                child = marks.items.get(step)
            elif isinstance(marks.items, list) and isinstance(step, int) and 0 <= step < len(marks.items):
                child = marks.items[step]
            if child is None:
                return marks
            marks = child
        return marks

    def key_origin(self, key: Any) -> Origin:
        """Where a mapping key is written (falls back to the mapping itself)."""
        if self.key_origins and key in self.key_origins:
            return self.key_origins[key]
        return self.origin


@dataclass
class YamlDocument:
    """The data of one file and the marks of every value in it."""

    path: str
    data: Any
    marks: Marks
    warnings: list[InventoryWarning] = field(default_factory=list)


def read_text(path: str) -> str:
    """The file's text: bounded in size, UTF-8 or a clear error naming the line of the first bad byte."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise InventoryError(Origin(path), f"cannot read the file: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise InventoryError(
            Origin(path),
            f"the file is {size} bytes, larger than the {MAX_FILE_BYTES} bytes mesh reads in one inventory file",
        )
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InventoryError(Origin(path), f"cannot read the file: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InventoryError(
            Origin(path, line, column),
            f"byte 0x{raw[exc.start]:02x} is not UTF-8; inventory files must be UTF-8 text",
        ) from None


def is_vault_text(text: str) -> bool:
    return text.lstrip().startswith(VAULT_HEADER)


def refuse_vault_file(path: str) -> InventoryError:
    return InventoryError(
        Origin(path, 1, 1),
        "the file is encrypted with Ansible Vault; mesh does not decrypt vaults yet",
        hint="decrypt it with `ansible-vault decrypt` or keep secrets out of the inventory",
    )


def load_yaml_file(path: str) -> YamlDocument:
    """Read a YAML (or JSON) file as Ansible's DataLoader does, with marks. Raises InventoryError."""
    return load_yaml_text(read_text(path), path)


def load_yaml_text(text: str, path: str) -> YamlDocument:
    if is_vault_text(text):
        raise refuse_vault_file(path)
    node = _compose(text, path)
    json_data, json_ok = _try_json(text)
    if node is None:
        if json_ok:
            return YamlDocument(path, json_data, Marks(Origin(path, 1, 1)))
        return YamlDocument(path, None, Marks(Origin(path, 1, 1)))
    builder = _Builder(path)
    builder.shares_nodes = "&" in text or "<<" in text
    if "&" in text:
        # Only aliases multiply values; without anchors, the node count is bounded by the text's size.
        builder.check_size(node)
    try:
        data, marks = builder.build(node, 0)
    except RecursionError:
        raise InventoryError(Origin(path), "values are nested too deeply to read") from None
    if json_ok:
        # Ansible's loader reads JSON with the json module when the text is JSON: its values win.
        data = json_data
    return YamlDocument(path, data, marks, builder.warnings)


def _try_json(text: str) -> tuple[Any, bool]:
    stripped = text.lstrip()
    if not stripped or stripped[0] not in "{[":
        return None, False
    try:
        return json.loads(text), True
    except ValueError:
        return None, False


# libyaml's parser when present: about ten times faster, and the one Ansible's own loader prefers.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _compose(text: str, path: str) -> Node | None:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, path, text) from None
    except yaml.YAMLError as exc:
        raise InventoryError(Origin(path), f"YAML cannot be read: {exc}") from None
    except RecursionError:
        raise InventoryError(Origin(path), "values are nested too deeply to read") from None
    finally:
        loader.dispose()
    return node


def _syntax_error(exc: yaml.MarkedYAMLError, path: str, text: str) -> InventoryError:
    mark = exc.problem_mark or exc.context_mark
    origin = Origin(path, mark.line + 1, mark.column + 1) if mark else Origin(path)
    problem = exc.problem or "invalid YAML"
    lines = text.splitlines()
    at_tab = mark is not None and mark.line < len(lines) and "\t" in lines[mark.line][: mark.column + 1]
    if "'\\t'" in problem or "\\t" in problem or at_tab:
        problem = "a tab character; YAML indentation must use spaces"
    context = f" {exc.context}" if exc.context else ""
    return InventoryError(origin, f"YAML syntax error: {problem}{context}")


def _origin(path: str, node: Node) -> Origin:
    mark = node.start_mark
    # tuple.__new__ skips the named tuple's Python-level constructor: this runs once per value.
    return _new_tuple(Origin, (path, mark.line + 1, mark.column + 1))


_new_tuple = tuple.__new__


class _Builder:
    """Turns composed nodes into plain data and Marks; aliases share one built value."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.warnings: list[InventoryWarning] = []
        self._built: dict[int, tuple[Any, Marks]] = {}
        # Only YAML aliases make one node appear twice; without anchors no memo is needed.
        self.shares_nodes = True
        self._constructor = yaml.SafeLoader("")
        # Inside a value tagged !unsafe every string is UnsafeText, as Ansible marks them (never templated).
        self._unsafe_depth = 0

    def check_size(self, root: Node) -> None:
        sizes: dict[int, int] = {}
        # Iterative post-order walk, so that deep nesting cannot exhaust the stack.
        stack: list[tuple[Node, bool, int]] = [(root, False, 0)]
        while stack:
            node, done, depth = stack.pop()
            key = id(node)
            if key in sizes:
                continue
            if depth > MAX_DEPTH:
                raise InventoryError(_origin(self.path, node), f"values are nested deeper than {MAX_DEPTH} levels")
            children = _children(node)
            if not done:
                stack.append((node, True, depth))
                stack.extend((child, False, depth + 1) for child in children if id(child) not in sizes)
                continue
            total = 1 + sum(sizes.get(id(child), 0) for child in children)
            if total > MAX_EXPANDED_NODES:
                raise InventoryError(
                    _origin(self.path, node),
                    f"this value expands to more than {MAX_EXPANDED_NODES} values through YAML aliases "
                    "(an alias bomb?); mesh refuses it",
                )
            sizes[key] = total

    def build(self, node: Node, depth: int) -> tuple[Any, Marks]:
        if not self.shares_nodes or self._unsafe_depth:
            return self._build_new(node, depth)
        key = id(node)
        if key in self._built:
            return self._built[key]
        result = self._build_new(node, depth)
        self._built[key] = result
        return result

    def _build_new(self, node: Node, depth: int) -> tuple[Any, Marks]:
        if node.tag == "!unsafe":
            return self._build_unsafe(node, depth)
        if isinstance(node, ScalarNode):
            if node.tag == "tag:yaml.org,2002:str":
                return self._text(node.value), Marks(_origin(self.path, node))
            return self._build_scalar(node)
        if isinstance(node, MappingNode):
            return self._build_mapping(node, depth)
        assert isinstance(node, SequenceNode)  # the composer makes only these three kinds
        return self._build_sequence(node, depth)

    def _text(self, value: str) -> str:
        return UnsafeText(value) if self._unsafe_depth else value

    def _build_unsafe(self, node: Node, depth: int) -> tuple[Any, Marks]:
        """`!unsafe` as Ansible's constructor reads it: the value its implicit tag gives (`!unsafe 12` is the
        number 12), with every string in it, however deep, marked unsafe."""
        copied = copy.copy(node)
        if isinstance(node, ScalarNode):
            copied.tag = self._constructor.resolve(ScalarNode, node.value, (True, False))
        elif isinstance(node, SequenceNode):
            copied.tag = "tag:yaml.org,2002:seq"
        else:
            copied.tag = "tag:yaml.org,2002:map"
        self._unsafe_depth += 1
        try:
            return self._build_new(copied, depth)
        finally:
            self._unsafe_depth -= 1

    def _build_scalar(self, node: Node) -> tuple[Any, Marks]:
        origin = _origin(self.path, node)
        tag = node.tag or ""
        if tag == "!vault":
            raise InventoryError(
                origin,
                "an Ansible Vault encrypted value; mesh does not decrypt vaults yet",
                hint="decrypt it with `ansible-vault decrypt_string` or keep secrets out of the inventory",
            )
        if not tag.startswith("tag:yaml.org,2002:"):
            raise InventoryError(origin, f"unknown YAML tag {tag}")
        if tag == "tag:yaml.org,2002:binary":
            raise InventoryError(origin, "a !!binary value; Ansible cannot print or use it (ansible-inventory fails)")
        if tag == "tag:yaml.org,2002:str":
            return self._text(node.value), Marks(origin)
        try:
            construct = self._constructor.yaml_constructors.get(tag)
            if construct is None:
                raise InventoryError(origin, f"unknown YAML tag {tag}")
            value = construct(self._constructor, node)
        except yaml.YAMLError as exc:
            raise InventoryError(origin, f"value cannot be read: {getattr(exc, 'problem', exc)}") from None
        if tag == "tag:yaml.org,2002:int":
            return value, Marks(origin, raw=str(node.value))
        return value, Marks(origin)

    def _build_sequence(self, node: SequenceNode, depth: int) -> tuple[Any, Marks]:
        if node.tag not in ("tag:yaml.org,2002:seq",):
            raise InventoryError(_origin(self.path, node), f"unsupported YAML tag {node.tag} on a sequence")
        values: list[Any] = []
        marks: list[Marks] = []
        for item in node.value:
            value, item_marks = self.build(item, depth + 1)
            values.append(value)
            marks.append(item_marks)
        return values, Marks(_origin(self.path, node), marks)

    def _build_mapping(self, node: MappingNode, depth: int) -> tuple[Any, Marks]:
        if node.tag not in ("tag:yaml.org,2002:map", "tag:yaml.org,2002:set"):
            raise InventoryError(_origin(self.path, node), f"unsupported YAML tag {node.tag} on a mapping")
        self._warn_duplicates(node)
        try:
            self._constructor.flatten_mapping(node)
        except yaml.YAMLError as exc:
            raise InventoryError(_origin(self.path, node), f"YAML merge key: {getattr(exc, 'problem', exc)}") from None
        values: dict[Any, Any] = {}
        items: dict[Any, Marks] = {}
        key_origins: dict[Any, Origin] = {}
        for key_node, value_node in node.value:
            key, _ = self.build(key_node, depth + 1)
            if isinstance(key, (list, dict)):
                raise InventoryError(_origin(self.path, key_node), "a mapping key must be a plain value")
            try:
                value, value_marks = self.build(value_node, depth + 1)
            except InventoryError as error:
                if error.key is None:  # name the key whose value could not be read (a !vault value, say)
                    error.key = str(key)
                raise
            values[key] = value
            items[key] = value_marks
            key_origins[key] = _origin(self.path, key_node)
        if node.tag == "tag:yaml.org,2002:set":
            return set(values), Marks(_origin(self.path, node), items, key_origins)
        return values, Marks(_origin(self.path, node), items, key_origins)

    def _warn_duplicates(self, node: MappingNode) -> None:
        seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value
            if key in seen:
                first = seen[key].start_mark.line + 1
                self.warnings.append(
                    InventoryWarning(
                        _origin(self.path, key_node),
                        f"duplicate key (first at line {first}); Ansible keeps only this last value",
                        key=str(key),
                    )
                )
            seen[key] = key_node


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []
