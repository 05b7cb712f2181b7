"""A proxy's previous files, kept on its host before new ones are moved into place, and put back when the
host fails its health gate. It owns the backup's place and the two commands; it decides nothing.
"""

from __future__ import annotations

import shlex

from mesh.config import paths
from mesh.config.xds import ADS_BOOTSTRAP_NAME
from mesh.plan.model import ProxyPlan

ROLLBACK_DIR = "/var/lib/mesh/rollback"  # root's, 0700: a tar per proxy, replaced by every run that changes it


def backup_path(proxy: str) -> str:
    return f"{ROLLBACK_DIR}/{proxy}.tar"


def backup_command(planned: ProxyPlan, root: str = "") -> str:
    """Keep the proxy's running files (bootstrap, trust bundle, xds/; keys stay where they are) in a tar.
    `root`: the folder standing for the host's / ("" on a host; a test's temp folder)."""
    folder = paths.proxy_dir(planned.name).lstrip("/")
    members = [f"{folder}/{name}" for name in (paths.XDS_DIR_NAME, paths.PROXY_CA_NAME, ADS_BOOTSTRAP_NAME, "envoy.yaml")]
    target = shlex.quote(root + backup_path(planned.name))
    listed = " ".join(shlex.quote(member) for member in members)
    return (f"mkdir -p -m 0700 {shlex.quote(root + ROLLBACK_DIR)} && cd {shlex.quote(root or '/')} && "
            f"present=$(for m in {listed}; do [ -e \"$m\" ] && "
            f"echo \"$m\"; done; true) && if [ -n \"$present\" ]; then tar -cf {target}.tmp $present && "
            f"mv -f {target}.tmp {target}; else rm -f {target}; fi")


def restore_command(planned: ProxyPlan, root: str = "") -> str:
    """Put the kept files back, each by a rename in its folder (Envoy reloads them; resource files before the
    bootstrap), and remove the resource files the backup had not; exits 3 when there is no backup. `root` as
    for backup_command."""
    q = shlex.quote
    folder = root + paths.proxy_dir(planned.name)
    staging = f"{folder}/.rollback"
    kept = f"{staging}{paths.proxy_dir(planned.name)}"
    kept_xds, xds = f"{kept}/{paths.XDS_DIR_NAME}", root + paths.xds_dir(planned.name)
    backup = root + backup_path(planned.name)
    return "; ".join([
        f"[ -f {q(backup)} ] || exit 3",
        "set -e",
        f"rm -rf {q(staging)}", f"mkdir -p {q(staging)}",
        f"tar -C {q(staging)} -xpf {q(backup)}",
        f"[ -f {q(kept)}/{paths.PROXY_CA_NAME} ] && mv -f {q(kept)}/{paths.PROXY_CA_NAME} {q(folder)}/ || true",
        (f"names=' '; for f in {q(kept_xds)}/*; do [ -f \"$f\" ] || continue; n=$(basename \"$f\"); "
        f"names=\"$names$n \"; mv -f \"$f\" {q(xds)}/\"$n\"; done"),
        (f"for f in {q(xds)}/*; do [ -f \"$f\" ] || continue; case \"$names\" in *\" $(basename \"$f\") \"*) ;; "
         "*) rm -f \"$f\" ;; esac; done"),
        f"[ -f {q(kept)}/{ADS_BOOTSTRAP_NAME} ] && mv -f {q(kept)}/{ADS_BOOTSTRAP_NAME} {q(folder)}/ || true",
        f"[ -f {q(kept)}/envoy.yaml ] && mv -f {q(kept)}/envoy.yaml {q(folder)}/envoy.yaml || true",
        f"rm -rf {q(staging)}",
    ])
