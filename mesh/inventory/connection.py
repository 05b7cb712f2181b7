"""Reads how mesh reaches a managed host from Ansible's own connection variables, and refuses every other
variable that changes how a host is reached. It must not look at mesh_* variables or other hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mesh.errors import Origin
from mesh.inventory.located import Located, Problems
from mesh.inventory.model import Connection
from mesh.inventory.values import (
    SshOptions,
    check_address,
    check_local_path,
    check_user_name,
    parse_bool,
    parse_port,
    parse_ssh_args,
)

Lookup = Callable[[str], Located | None]

_PASSWORDS = (
    "ansible_password", "ansible_ssh_pass", "ansible_ssh_password", "ansible_become_password",
    "ansible_become_pass", "ansible_sudo_pass", "ansible_sudo_password", "ansible_su_pass", "ansible_su_password",
)
_OTHER_BECOME = (
    "ansible_become_exe", "ansible_become_flags", "ansible_sudo", "ansible_sudo_user", "ansible_sudo_exe",
    "ansible_sudo_flags", "ansible_su", "ansible_su_user", "ansible_su_exe", "ansible_su_flags",
)
_OTHER_TRANSPORT = ("ansible_ssh_executable", "ansible_shell_type", "ansible_ssh_args")
_OTHER_PLUGIN_PREFIXES = (
    "ansible_winrm_", "ansible_psrp_", "ansible_paramiko_", "ansible_libssh_", "ansible_httpapi_",
    "ansible_netconf_", "ansible_network_", "ansible_docker_", "ansible_podman_", "ansible_kubectl_",
    "ansible_buildah_", "ansible_chroot_", "ansible_jail_", "ansible_lxd_", "ansible_zone_", "ansible_machinectl_",
)
CONNECTIONS = ("ssh", "local")


def refused_variable(name: str) -> str | None:
    """Why a connection variable is refused, or None when mesh accepts (or does not care about) it."""
    if name in _PASSWORDS:
        return ("mesh reaches hosts with SSH keys and sudo without a password; "
                "passwords in the inventory are refused")
    if name in _OTHER_BECOME:
        return "mesh becomes root with sudo only (ansible_become, ansible_become_user); this setting is refused"
    if name in _OTHER_TRANSPORT:
        return ("mesh connects with its own SSH client; only ansible_ssh_common_args and ansible_ssh_extra_args "
                "(-o UserKnownHostsFile, ProxyJump, StrictHostKeyChecking=yes) are read")
    if name.startswith(_OTHER_PLUGIN_PREFIXES):
        return "a setting of an Ansible connection mesh does not use (mesh reaches hosts over SSH or locally)"
    return None


def read_connection(host: str, written: Mapping[str, Origin], lookup: Lookup, default_known_hosts: str,
                    problems: Problems) -> Connection | None:
    """The Connection of a managed host; None (with problems recorded) when it cannot be read."""
    before = len(problems.errors)
    for name, origin in written.items():
        reason = refused_variable(name)
        if reason is not None:
            # Refused whatever its value: not rendered, so a lookup in a password is refused as a password.
            problems.at(Located(None, origin, name), reason)
    local = _connection_is_local(lookup, problems)
    _check_become_method(lookup, problems)
    address = _read(lookup, problems, check_address, "ansible_host", "ansible_ssh_host")
    port = _read(lookup, problems, parse_port, "ansible_port", "ansible_ssh_port")
    user = _read(lookup, problems, check_user_name, "ansible_user", "ansible_ssh_user")
    key_file = _read(lookup, problems, lambda v: check_local_path(v, "a path to a private key"),
                     "ansible_private_key_file", "ansible_ssh_private_key_file")
    become = _read(lookup, problems, parse_bool, "ansible_become")
    become_user = _read(lookup, problems, check_user_name, "ansible_become_user")
    common = _ssh_args(lookup, "ansible_ssh_common_args", problems)
    extra = _ssh_args(lookup, "ansible_ssh_extra_args", problems)
    if len(problems.errors) > before or local is None or common is None or extra is None:
        return None
    assert common is not None and extra is not None
    # ssh keeps the first value it reads of an option; Ansible puts common args before extra args.
    return Connection(
        address=address or host,
        port=port or 22,
        user=user,
        private_key_file=key_file,
        known_hosts=common[1].known_hosts or extra[1].known_hosts or default_known_hosts,
        ssh_common_args=common[0],
        ssh_extra_args=extra[0],
        proxy_jump=common[1].proxy_jump or extra[1].proxy_jump,
        become=bool(become),
        become_user=become_user or "root",
        local=local,
    )


def ssh_port(lookup: Lookup) -> int | None:
    """The host's SSH port as Ansible reads it (ansible_ssh_port wins), or None when it is not valid."""
    for name in ("ansible_ssh_port", "ansible_port"):
        spot = lookup(name)
        if spot is not None:
            try:
                return parse_port(spot.value)
            except ValueError:
                return None
    return 22


def _read(lookup: Lookup, problems: Problems, reader: Callable[[object], object], *names: str) -> Any:
    # Ansible's ssh plugin takes the last defined of its variable names: ansible_ssh_host beats ansible_host.
    # The others are checked too: the runner's templates may still read them.
    found: Any = None
    chosen = False
    for name in reversed(names):
        spot = lookup(name)
        if spot is not None:
            value = problems.read(spot, reader)
            if not chosen:
                found, chosen = value, True
    return found


def _connection_is_local(lookup: Lookup, problems: Problems) -> bool | None:
    spot = lookup("ansible_connection")
    if spot is None:
        return False
    if spot.value not in CONNECTIONS:
        problems.at(spot, f"mesh reaches hosts with `ssh` or runs `local`ly; the connection {spot.value!r} is "
                          "refused")
        return None
    return bool(spot.value == "local")


def _check_become_method(lookup: Lookup, problems: Problems) -> None:
    spot = lookup("ansible_become_method")
    if spot is not None and spot.value != "sudo":
        problems.at(spot, f"mesh becomes root with sudo (without a password) only; got {spot.value!r}")


def _ssh_args(lookup: Lookup, name: str, problems: Problems) -> tuple[str, SshOptions] | None:
    spot = lookup(name)
    if spot is None:
        return "", SshOptions()
    options = problems.read(spot, parse_ssh_args)
    if options is None:
        return None
    return str(spot.value or ""), options
