"""Loads an inventory path as ansible-inventory does: a YAML, JSON or INI file, a folder of them, or a dynamic
source (a script or a plugin configuration, read through the user's own `ansible-inventory`), then the
`group_vars/` and `host_vars/` beside it. It must not import ansible: that runs in a subprocess only.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any

from mesh.errors import InventoryError, InventoryErrors, InventoryWarning, MeshError, Origin
from mesh.inventory.data import InventoryData, UnsafeText, Var
from mesh.inventory.resolve import reconcile
from mesh.inventory.yaml_format import read_yaml_inventory, yaml_var
from mesh.inventory.yamlfile import load_yaml_file, load_yaml_text, read_text
from mesh.suggest import did_you_mean

YAML_EXTENSIONS = (".yml", ".yaml", ".json")
# ansible-core's defaults: REJECT_EXTS + INVENTORY_IGNORE_EXTS, and names always skipped in a folder.
IGNORED_EXTENSIONS = (".pyc", ".pyo", ".swp", ".bak", "~", ".rpm", ".md", ".txt", ".rst", ".orig", ".cfg", ".retry")
_IGNORED_NAMES = re.compile(r"^\.|^host_vars$|^group_vars$|^vars_plugins$")
DYNAMIC_TIMEOUT_SECONDS = 600


def load_inventory(path: str) -> InventoryData:
    """Read the inventory at path (file or folder) with its group_vars/ and host_vars/. Raises InventoryError."""
    # Loading makes hundreds of thousands of small objects that all live on: the cyclic collector would
    # re-scan them again and again (it was three quarters of the time on 10,000 hosts) and find nothing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _load_inventory(path)
    except MemoryError:
        raise InventoryError(Origin(path), "the inventory needs more memory than mesh has to read it") from None
    except RecursionError:
        raise InventoryError(Origin(path), "the inventory is nested too deeply to read") from None
    finally:
        if was_enabled:
            gc.enable()


def _load_inventory(path: str) -> InventoryData:
    source = os.path.abspath(path)
    if not os.path.exists(source):
        raise InventoryError(Origin(path), "no such file or folder")
    data = InventoryData(sources=[source])
    if os.path.isdir(source):
        if not _read_folder(source, data):
            raise InventoryError(Origin(path), "the folder holds no inventory file (Ansible finds nothing to parse)")
        vars_dir = source
    else:
        _read_file(source, data)
        vars_dir = os.path.dirname(source)
    reconcile(data)
    load_vars_dirs(data, vars_dir)
    _warn_empty_children(data)
    check_connection_vars(data)
    return data


def _read_folder(folder: str, data: InventoryData) -> bool:
    """Every file in folder, sorted, recursing into subfolders, skipping what Ansible skips; True if any."""
    parsed = False
    for name in sorted(os.listdir(folder)):
        if _IGNORED_NAMES.search(name) or name.endswith(IGNORED_EXTENSIONS):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            parsed = _read_folder(path, data) or parsed
        else:
            _read_file(path, data)
            parsed = True
    return parsed


def _read_file(path: str, data: InventoryData) -> None:
    extension = os.path.splitext(path)[1]
    if _is_script(path):
        _read_dynamic(path, data)
        return
    if extension == ".toml":
        raise InventoryError(Origin(path), "TOML inventories are not read by mesh; write it in YAML or INI")
    text = read_text(path)
    if not text.strip():
        raise InventoryError(Origin(path, 1, 1), "the file is empty (Ansible reads it as an empty inventory)")
    if extension in YAML_EXTENSIONS:
        doc = load_yaml_text(text, path)
        if extension != ".json" and isinstance(doc.data, dict) and doc.data.get("plugin"):
            _read_dynamic(path, data)
            return
        read_yaml_inventory(doc, data)
    elif extension:
        _read_ini(text, path, data)
    else:
        _read_unnamed(text, path, data)


def _read_unnamed(text: str, path: str, data: InventoryData) -> None:
    """A file with no extension: Ansible's yaml plugin takes a YAML mapping, its ini plugin the rest."""
    try:
        doc = load_yaml_text(text, path)
    except InventoryError as yaml_error:
        try:
            _read_ini(text, path, data)
        except InventoryError as ini_error:
            raise InventoryErrors([ini_error, _as_yaml_error(yaml_error)]) from None
        return
    if isinstance(doc.data, dict):
        read_yaml_inventory(doc, data)
    else:
        _read_ini(text, path, data)


def _as_yaml_error(error: InventoryError) -> InventoryError:
    return InventoryError(error.origin, f"read as YAML instead: {error.message}", key=error.key, hint=error.hint)


def _read_ini(text: str, path: str, data: InventoryData) -> None:
    try:
        from mesh.inventory.ini_format import read_ini
    except ImportError:
        raise MeshError(f"{path}: INI inventories are not supported in this build of mesh") from None
    read_ini(text, path, data)


def _is_script(path: str) -> bool:
    if not os.access(path, os.X_OK):
        return False
    # Ansible's script plugin runs any executable; one the kernel cannot run fails there and the file is
    # then read as YAML or INI. A '#!' line is what the kernel needs (binaries aside).
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith(b"#!") or head == b"\x7fELF"


def _read_dynamic(path: str, data: InventoryData) -> None:
    """Run the user's own `ansible-inventory` on a script or plugin configuration and read what it prints.

    `--export` keeps group variables on their groups, and vars plugins are off: mesh reads group_vars/ and
    host_vars/ itself, so the precedence is the same as for a static file.
    """
    program = shutil.which("ansible-inventory")
    if program is None:
        raise MeshError(
            f"{path} is a dynamic inventory (a script or an inventory plugin configuration); mesh reads it "
            "through Ansible's `ansible-inventory`, which is not on PATH",
            hint="install ansible-core (pip install ansible-core), or export the inventory to YAML",
        )
    env = dict(os.environ, ANSIBLE_INVENTORY_UNPARSED_FAILED="true", ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true",
               ANSIBLE_VARS_ENABLED="none")
    try:
        with tempfile.TemporaryDirectory(prefix="mesh-inventory-") as empty:
            # From an empty folder: ansible-inventory would also read ./group_vars of the current folder.
            done = subprocess.run([program, "-i", path, "--list", "--export"], cwd=empty, env=env,
                                  capture_output=True, text=True, timeout=DYNAMIC_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise InventoryError(Origin(path), f"ansible-inventory ran longer than {DYNAMIC_TIMEOUT_SECONDS}s") from None
    except OSError as exc:
        raise MeshError(f"cannot run {program}: {exc.strerror}") from None
    if done.returncode != 0:
        detail = " ".join(done.stderr.strip().splitlines()[-6:]) or "no message"
        raise InventoryError(Origin(path), f"ansible-inventory could not read it (exit {done.returncode}): {detail}")
    try:
        listing = json.loads(done.stdout)
    except ValueError:
        raise InventoryError(Origin(path), "ansible-inventory printed something that is not JSON") from None
    read_listing(listing, path, data)


def read_listing(listing: Any, path: str, data: InventoryData) -> None:
    """Add what `ansible-inventory --list [--export]` printed to data; every origin is path."""
    where = Origin(path)
    if not isinstance(listing, dict):
        raise InventoryError(where, "the inventory listing is not a JSON object")
    groups = {name: body for name, body in listing.items() if name != "_meta" and isinstance(body, dict)}
    for name in groups:
        data.add_group(name, where)
    for name, body in groups.items():
        for host in body.get("hosts") or []:
            data.add_host(host, where, name)
        for child in body.get("children") or []:
            data.add_child(name, child, where)
        for key, value in (body.get("vars") or {}).items():
            data.set_group_var(name, key, Var(_from_json(value), where))
    hostvars = (listing.get("_meta") or {}).get("hostvars") or {}
    for host, variables in hostvars.items():
        if host not in data.hosts:
            data.add_host(host, where)
        for key, value in variables.items():
            data.set_host_var(host, key, Var(_from_json(value), where))


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("__ansible_unsafe"), str):
            return UnsafeText(value["__ansible_unsafe"])
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


def _warn_empty_children(data: InventoryData) -> None:
    """A group named under `children:` that has no hosts and no children anywhere: Ansible creates it
    silently; it is most often a misspelt group name."""
    for group in data.groups.values():
        if group.child_origin is None or group.hosts or group.children:
            continue
        others = [name for name, other in data.groups.items() if other.hosts or other.children]
        hint = did_you_mean(group.name, [name for name in others if name != group.name])
        message = "this child group has no hosts and no children anywhere in the inventory"
        if hint:
            message += f" ({hint})"
        data.warn(InventoryWarning(group.child_origin, message, key=group.name))


def load_vars_dirs(data: InventoryData, folder: str) -> None:
    """group_vars/ and host_vars/ in folder, as Ansible's host_group_vars plugin finds them: for each group
    and host, the first of NAME, NAME.yml, NAME.yaml, NAME.json (a folder of such files is walked)."""
    base = os.path.realpath(folder)
    for subdir, names, kind in (("group_vars", list(data.groups), "group"), ("host_vars", list(data.hosts), "host")):
        where = os.path.join(base, subdir)
        if not os.path.isdir(where):
            if os.path.exists(where):
                data.warn(InventoryWarning(Origin(where), f"{subdir} is not a folder; Ansible skips it"))
            continue
        entries = set(os.listdir(where))
        _warn_unmatched(data, where, entries, names, kind)
        for name in names:
            if name.startswith(os.sep):
                continue  # Ansible skips such names (chroot paths)
            found = _vars_files(where, name, entries)
            if found:
                target = data.groups[name].file_vars if kind == "group" else data.hosts[name].file_vars
                for path in found:
                    _load_vars_file(path, target, data)
    data.revision += 1


def _vars_files(where: str, name: str, entries: set[str]) -> list[str]:
    for candidate in (name, *(name + extension for extension in YAML_EXTENSIONS)):
        if os.sep in name:
            if not os.path.exists(os.path.join(where, candidate)):
                continue
        elif candidate not in entries:
            continue
        path = os.path.join(where, candidate)
        return _vars_folder(path) if os.path.isdir(path) else [path]
    return []


def _vars_folder(folder: str) -> list[str]:
    """Files of a group_vars/NAME/ folder in Ansible's order: sorted, recursing into folders without an
    extension, skipping hidden files, backups (~) and extensions other than .yml, .yaml, .json."""
    found: list[str] = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or name.endswith("~"):
            continue
        extension = os.path.splitext(name)[1]
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            if not extension:
                found.extend(_vars_folder(path))
        elif os.path.isfile(path) and (not extension or extension in YAML_EXTENSIONS):
            found.append(path)
    return found


def _load_vars_file(path: str, target: dict[str, Var], data: InventoryData) -> None:
    doc = load_yaml_file(path)
    data.warnings.extend(doc.warnings)
    if not doc.data:
        return  # Ansible ignores an empty variables file
    if not isinstance(doc.data, dict):
        raise InventoryError(doc.marks.origin, "a variables file must be a mapping of names to values, "
                             f"not a {type(doc.data).__name__} (Ansible fails on it)")
    for name, value in doc.data.items():
        if not isinstance(name, str):
            raise InventoryError(doc.marks.key_origin(name), "a variable name must be text", key=str(name))
        target[name] = yaml_var(name, value, doc.marks, data)


def _warn_unmatched(data: InventoryData, where: str, entries: set[str], names: list[str], kind: str) -> None:
    known = set(names)
    for entry in sorted(entries):
        if entry.startswith(".") or entry.endswith("~"):
            continue
        stem, extension = os.path.splitext(entry)
        if entry in known:
            continue
        if extension in YAML_EXTENSIONS and stem in known:
            first = next(c for c in (stem, *(stem + e for e in YAML_EXTENSIONS)) if c in entries)
            if first != entry:
                data.warn(InventoryWarning(Origin(os.path.join(where, entry)),
                                           f"Ansible ignores this file: it reads only {first} for {kind} '{stem}'"))
            continue
        if extension and extension not in YAML_EXTENSIONS:
            continue
        hint = did_you_mean(stem, known)
        message = f"no {kind} named '{stem}' in the inventory; Ansible ignores this file"
        data.warn(InventoryWarning(Origin(os.path.join(where, entry)), message + (f" ({hint})" if hint else "")))


_PORT_IN_HOST = re.compile(r"^(\[[^\]]*\]|[^:\[\]]+):[0-9]+$")


def check_connection_vars(data: InventoryData) -> None:
    """Warn about connection variables that Ansible takes but almost surely not as meant."""
    layers = [layer for group in data.groups.values() for layer in (group.vars, group.file_vars)]
    layers += [layer for host in data.hosts.values() for layer in (host.vars, host.file_vars)]
    for layer in layers:
        port = layer.get("ansible_port")
        if port is not None and not _is_port(port.value):
            data.warn(InventoryWarning(port.origin, f"{port.value!r} is not a port (an integer 1-65535)",
                                       key="ansible_port"))
        address = layer.get("ansible_host")
        if address is not None and isinstance(address.value, str) and _PORT_IN_HOST.fullmatch(address.value):
            data.warn(InventoryWarning(address.origin, f"{address.value!r} has a port in it; Ansible uses the whole "
                                       "text as the address (set ansible_port instead)", key="ansible_host"))


def _is_port(value: Any) -> bool:
    if isinstance(value, str) and value.isdigit() and not (len(value) > 1 and value.startswith("0")):
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535
