"""The controllers' narrow access to a managed host, as files: the `mesh-ctl` account's authorized_keys (one forced,
restricted key per controller), its sudoers rule (that one script, as root), and the identities file the script
reads. Pure text from the plan's own data; build.py decides which hosts get them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.config import paths
from mesh.controller.spec import CTL_HOME, CTL_IDENTITIES, CTL_SCRIPT, CTL_USER
from mesh.errors import MeshError
from mesh.healthcheck.config import CA_FILE as CHECKER_CA_FILE
from mesh.healthcheck.config import CHECKER_USER
from mesh.healthcheck.config import CONFIG_DIR as CHECKER_DIR

CTL_SSH_DIR = f"{CTL_HOME}/.ssh"
CTL_AUTHORIZED_KEYS = f"{CTL_SSH_DIR}/authorized_keys"
CTL_IDENTITIES_DIR = CTL_IDENTITIES.rsplit("/", 1)[0]
CTL_SHELL = "/bin/sh"  # the forced command runs through the user's shell; nologin would refuse it
CTL_COMMENT = "mesh controller access"
SUDOERS_CHECK = "visudo -cf %s"  # sudo's own check of a staged rule (%s: its path)
FORCED_COMMAND = f'sudo -n {CTL_SCRIPT} \\"$SSH_ORIGINAL_COMMAND\\"'
_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa")
_BASE64 = re.compile(r"[A-Za-z0-9+/]{1,16384}={0,2}")  # the key blob: nothing sshd could read as an option


class ControllerKeyError(MeshError):
    """A controller's public key is not one line of `TYPE BASE64 [COMMENT]`."""


@dataclass(frozen=True)
class IdentityLine:
    """One line of /etc/mesh/ctl/identities: `NAME KIND HOME OWNER CN TRUST IMAGE`."""

    name: str
    kind: str  # vm | container | checker
    home: str
    owner: str
    common_name: str
    trust: str
    image: str = "-"

    def text(self) -> str:
        return f"{self.name} {self.kind} {self.home} {self.owner} {self.common_name} {self.trust} {self.image}"


def checker_identity_line() -> IdentityLine:
    return IdentityLine("checker", "checker", CHECKER_DIR, CHECKER_USER, "health", CHECKER_CA_FILE)


def proxy_identity_line(proxy: str, service: str, owner: str, image: str | None) -> IdentityLine:
    return IdentityLine(proxy, "container" if image else "vm", paths.proxy_dir(proxy), owner, service,
                        paths.proxy_ca_path(proxy), image or "-")


def identities_text(lines: tuple[IdentityLine, ...]) -> str:
    header = "# NAME KIND HOME OWNER CN TRUST IMAGE: what mesh-ctl may touch on this host (written by mesh deploy)\n"
    return header + "".join(line.text() + "\n" for line in lines)


def public_key(line: str, controller: str) -> str:
    """`TYPE BASE64` of a controller's id_ed25519.pub (its comment dropped); ControllerKeyError otherwise."""
    words = line.strip().split()
    if (len(words) < 2 or words[0] not in _KEY_TYPES or not _BASE64.fullmatch(words[1])
            or len(line.strip().splitlines()) != 1):
        raise ControllerKeyError(f"the SSH public key read from controller {controller} is not one "
                                 f"`TYPE BASE64 COMMENT` line", "run `mesh controller rotate-keys` to make a new one")
    return f"{words[0]} {words[1]}"


def authorized_keys_text(keys: Mapping[str, str]) -> str:
    """One restricted, forced-command line per controller (host name -> `TYPE BASE64`), sorted by host."""
    header = ("# mesh controllers: each key may only run mesh-ctl through sudo (written by mesh deploy; "
              "`mesh controller rotate-keys` replaces them)\n")
    return header + "".join(f'restrict,command="{FORCED_COMMAND}" {keys[host]} mesh-controller@{host}\n'
                            for host in sorted(keys))


def sudoers_text() -> str:
    return (f"# mesh: the controllers' account may run mesh-ctl as root, nothing else (written by mesh deploy)\n"
            f"Defaults:{CTL_USER} !requiretty, !lecture, env_reset\n"
            f"{CTL_USER} ALL=(root) NOPASSWD: {CTL_SCRIPT} *\n")

