"""Ansible's builtin modules mesh runs (copy, template, file, systemd_service, command, shell), a subset of
their arguments. Each reads facts, decides, and yields only the changes needed; none applies anything itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shlex
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound

from mesh.deploy.errors import ModuleFailure
from mesh.deploy.modules.api import Change, ModuleRun, Outcome, PutFile, RunCommand, TaskContext
from mesh.deploy.variables import WithGlobals, to_bool
from mesh.hosts.connection import CommandResult
from mesh.hosts.facts import FileStat, UnitState, file_sha256, file_stat, path_exists, unit_state

if TYPE_CHECKING:
    from mesh.deploy.modules import ModuleRegistry

FILE_STATES = ("file", "directory", "absent", "touch")
UNIT_STATES = ("started", "stopped", "restarted", "reloaded")
STAGING_DIR = ".mesh-staged"


def unit_check(unit_name: str) -> str:
    """`systemd-analyze verify` of a staged unit: refused on a non-zero exit, and also when systemd says anything
    about this unit (it exits 0 on a setting it would ignore, such as `ProtectProc=bogus`); what it says about
    other units of the host does not count."""
    name = shlex.quote(f"{unit_name}:")
    return ("o=$(systemd-analyze verify --man=no %s 2>&1); r=$?; [ -z \"$o\" ] || echo \"$o\" >&2; "
            f"[ $r -eq 0 ] && ! echo \"$o\" | grep -q -F -e %s -e {name}")


def staged_path(dest: str) -> str:
    """Where a new file waits for its check: a hidden folder beside dest (the same filesystem, so moving it in is
    one rename; systemd and nft read nothing there), under dest's own name (systemd-analyze needs it)."""
    folder, name = posixpath.split(dest)
    return posixpath.join(folder, STAGING_DIR, name)


def install_checked(dest: str, data: bytes, mode: int, owner: str | None, group: str | None,
                    validate: str) -> Generator[Change, CommandResult | None, str | None]:
    """Changes that stage data beside dest, check it with `validate` (its %s replaced by the staged path), and
    only then rename it over dest. Returns None, or the check's message (the staged file removed, dest untouched).

        refused = yield from install_checked("/etc/mesh/firewall.nft", rules, 0o644, "root", "root", "nft -c -f %s")
    """
    if "%s" not in validate:
        raise ModuleFailure(f"validate must contain %s (the staged file): {validate!r}")
    staged = staged_path(dest)
    quoted = shlex.quote(staged)
    yield RunCommand(f"mkdir -p -m 0700 -- {shlex.quote(posixpath.dirname(staged))}", "create the staging folder",
                     changes=False)
    yield PutFile(staged, data, mode, owner, group, f"send {dest} (to check)")
    checked = yield RunCommand(validate.replace("%s", quoted), f"check {dest}", check_exit=False, changes=False)
    if checked is not None and not checked.ok:
        yield RunCommand(f"rm -f -- {quoted}", "remove the refused file", changes=False)
        return checked.error_text() or f"the check exited {checked.code}"
    yield RunCommand(f"mv -f -- {quoted} {shlex.quote(dest)}", f"install {dest}")
    return None


def parse_mode(value: Any) -> int | None:
    """A mode as Ansible takes it: an int (YAML's 0640 is already octal) or a string of octal digits."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value)
    try:
        return int(text, 8)
    except ValueError:
        raise ModuleFailure(f"mode {text!r} is not an octal mode such as '0640' (symbolic modes are not "
                            "supported)") from None


def _require(args: dict[str, Any], *names: str) -> Any:
    for name in names:
        if args.get(name) not in (None, ""):
            return args[name]
    raise ModuleFailure(f"missing required argument: {names[0]}")


def _no(args: dict[str, Any], name: str) -> None:
    if to_bool(args.get(name, False)):
        raise ModuleFailure(f"{name}=yes is not supported by mesh")


def attribute_changes(path: str, stat: FileStat, mode: int | None, owner: str | None,
                      group: str | None, recurse: bool = False) -> Iterator[Change]:
    """chown/chmod for what differs from the wanted owner, group and mode."""
    flag = "-R " if recurse else ""
    if (owner and owner != stat.owner) or (group and group != stat.group):
        who = (owner or "") + (f":{group}" if group else "")
        yield RunCommand(f"chown {flag}{shlex.quote(who)} {shlex.quote(path)}", f"owner {who}")
    if mode is not None and mode != stat.mode:
        yield RunCommand(f"chmod {flag}{mode:04o} {shlex.quote(path)}", f"mode {mode:04o}")


def write_file(ctx: TaskContext[Any], dest: str, data: bytes, args: dict[str, Any]) -> ModuleRun:
    """Make dest hold data with the wanted attributes: put only when the checksums differ (shared by modules)."""
    mode, owner, group = parse_mode(args.get("mode")), args.get("owner"), args.get("group")
    stat = file_stat(ctx.connector, dest)
    if stat is not None and stat.kind == "directory":
        raise ModuleFailure(f"{dest} is a directory")
    want = hashlib.sha256(data).hexdigest()
    if stat is not None and not to_bool(args.get("force", True)):
        return Outcome(msg=f"{dest} exists and force is no", data={"dest": dest})
    if stat is None or file_sha256(ctx.connector, dest) != want:
        attrs = (mode if mode is not None else (stat.mode if stat else 0o644),
                 owner or (stat.owner if stat else None), group or (stat.group if stat else None))
        if args.get("validate"):
            refused = yield from install_checked(dest, data, *attrs, str(args["validate"]))
            if refused is not None:
                return Outcome(msg=f"failed to validate {dest} (it is left as it was): {refused}",
                               data={"dest": dest}, failed=True)
        else:
            yield PutFile(dest, data, *attrs, f"write {dest}")
    else:
        yield from attribute_changes(dest, stat, mode, owner, group)
    return Outcome(data={"dest": dest, "checksum": want, "size": len(data)})


def copy(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    _no(args, "backup")
    dest = str(_require(args, "dest"))
    if "content" in args and args["content"] is not None:
        content = args["content"]
        data = content.encode() if isinstance(content, str) else json.dumps(content).encode()
    else:
        src = str(_require(args, "src", "content"))
        path = _find_source(ctx.files_dir, src)
        data = path.read_bytes()
        if dest.endswith("/"):
            dest += path.name
    return (yield from write_file(ctx, dest, data, args))


def _find_source(files_dir: Path, src: str) -> Path:
    candidates = [Path(src)] if os.path.isabs(src) else [files_dir / "files" / src, files_dir / src]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModuleFailure(f"cannot find the copy source {src!r} (looked in {files_dir}/files and {files_dir})")


def template(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    _no(args, "backup")
    src, dest = str(_require(args, "src")), str(_require(args, "dest"))
    env = Environment(loader=FileSystemLoader([str(ctx.templates_dir), str(ctx.files_dir / "templates")]),
                      undefined=StrictUndefined, trim_blocks=True, keep_trailing_newline=True, autoescape=False)
    try:
        compiled = env.get_template(src)
        scope = WithGlobals(ctx.vars, env.globals)
        text = "".join(compiled.root_render_func(compiled.new_context(scope, shared=True)))  # type: ignore[arg-type]
    except TemplateNotFound:
        raise ModuleFailure(f"template {src!r} not found in {ctx.templates_dir}") from None
    except TemplateError as exc:
        raise ModuleFailure(f"template {src}: {exc}") from None
    return (yield from write_file(ctx, dest, text.encode(), args))


def file(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    path = str(_require(args, "path", "dest", "name"))
    state = str(args.get("state") or "file")
    if state not in FILE_STATES:
        raise ModuleFailure(f"state must be one of {', '.join(FILE_STATES)}; got {state!r}")
    mode, owner, group = parse_mode(args.get("mode")), args.get("owner"), args.get("group")
    recurse = to_bool(args.get("recurse", False))
    stat = file_stat(ctx.connector, path)
    quoted = shlex.quote(path)
    if state == "absent":
        if stat is not None:
            yield RunCommand(f"rm -rf -- {quoted}", f"remove {path}")
    elif state == "directory":
        if stat is None:
            yield RunCommand(f"mkdir -p -- {quoted}", f"create {path}")
            stat = FileStat("directory", -1, "", "")
        elif stat.kind != "directory":
            raise ModuleFailure(f"{path} exists and is not a directory ({stat.kind})")
        yield from attribute_changes(path, stat, mode, owner, group, recurse)
    elif state == "touch":
        yield RunCommand(f"touch -- {quoted}", f"touch {path}")
        yield from attribute_changes(path, stat or FileStat("file", -1, "", ""), mode, owner, group)
    else:
        if stat is None:
            raise ModuleFailure(f"file {path} does not exist (use state=touch to create it)")
        yield from attribute_changes(path, stat, mode, owner, group)
    return Outcome(data={"path": path, "state": state})


def systemd_service(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    name = args.get("name")
    state, enabled = args.get("state"), args.get("enabled")
    if state is not None and state not in UNIT_STATES:
        raise ModuleFailure(f"state must be one of {', '.join(UNIT_STATES)}; got {state!r}")
    if to_bool(args.get("daemon_reload", False)):
        # Before reading the unit: a unit file written by an earlier task is known only after it.
        yield RunCommand("systemctl daemon-reload", "daemon-reload", changes=False)
    if name is None:
        if state is not None or enabled is not None:
            raise ModuleFailure("missing required argument: name")
        return Outcome(msg="daemon reloaded")
    unit = str(name)
    quoted = shlex.quote(unit)
    facts = unit_state(ctx.connector, unit)
    if not facts.loaded and ctx.check_mode and (state is not None or enabled is not None):
        facts = UnitState(True, "inactive", False)  # an earlier task would have installed it
    if not facts.loaded and (state is not None or enabled is not None):
        raise ModuleFailure(f"could not find the requested service {unit}: systemd has no such unit")
    if enabled is not None and to_bool(enabled) != facts.enabled:
        verb = "enable" if to_bool(enabled) else "disable"
        yield RunCommand(f"systemctl {verb} {quoted}", f"{verb} {unit}")
    running = facts.active in ("active", "activating", "reloading")
    if state == "started" and not running:
        yield RunCommand(f"systemctl start {quoted}", f"start {unit}")
    elif state == "stopped" and running:
        yield RunCommand(f"systemctl stop {quoted}", f"stop {unit}")
    elif state == "restarted":
        yield RunCommand(f"systemctl restart {quoted}", f"restart {unit}")
    elif state == "reloaded":
        yield RunCommand(f"systemctl {'reload' if running else 'start'} {quoted}", f"reload {unit}")
    return Outcome(data={"name": unit, "state": state or facts.active,
                         "enabled": facts.enabled if enabled is None else to_bool(enabled)})


def command(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    argv = args.get("argv")
    if argv is not None:
        line = shlex.join(str(word) for word in argv)
    else:
        line = shlex.join(shlex.split(str(_require(args, "cmd"))))  # no shell: pipes and $VARS stay literal
    return (yield from _run_line(ctx, args, line))


def shell(ctx: TaskContext[Any], args: dict[str, Any]) -> ModuleRun:
    return (yield from _run_line(ctx, args, str(_require(args, "cmd"))))


def _run_line(ctx: TaskContext[Any], args: dict[str, Any], line: str) -> ModuleRun:
    creates, removes = args.get("creates"), args.get("removes")
    if creates and path_exists(ctx.connector, str(creates)):
        return Outcome(msg=f"skipped, since {creates} exists", data={"cmd": line, "rc": 0})
    if removes and not path_exists(ctx.connector, str(removes)):
        return Outcome(msg=f"skipped, since {removes} does not exist", data={"cmd": line, "rc": 0})
    full = f"cd {shlex.quote(str(args['chdir']))} && {line}" if args.get("chdir") else line
    stdin = args.get("stdin")
    result = yield RunCommand(full, line, stdin=str(stdin).encode() if stdin is not None else None,
                              check_exit=False)
    if result is None:  # check mode: not run
        return Outcome(msg="not run in check mode", data={"cmd": line})
    data: dict[str, Any] = {"cmd": line, "rc": result.code, "stdout": result.stdout.decode(errors="replace").rstrip("\n"),
            "stderr": result.stderr.decode(errors="replace").rstrip("\n")}
    data["stdout_lines"] = data["stdout"].splitlines()
    failed = result.code != 0
    return Outcome(msg="non-zero return code" if failed else "", data=data, failed=failed)


def register_builtins(registry: ModuleRegistry) -> None:
    attrs = ("mode", "owner", "group")
    registry.register("copy", copy, ("src", "content", "dest", "backup", "force", "validate", *attrs))
    registry.register("template", template, ("src", "dest", "backup", "force", "validate", *attrs))
    registry.register("file", file, ("path", "dest", "name", "state", "recurse", *attrs))
    unit_params = ("name", "state", "enabled", "daemon_reload")
    registry.register("systemd_service", systemd_service, unit_params)
    registry.register("systemd", systemd_service, unit_params)
    run_params = ("cmd", "argv", "creates", "removes", "chdir", "stdin")
    registry.register("command", command, run_params, free_form="cmd")
    registry.register("shell", shell, run_params, free_form="cmd")
