"""Names and paths of a proxy on its managed host (design12): files under /etc/mesh, units, Envoy's binary.

It owns these strings so that config, render, deploy and status agree; it must not touch any file.
"""

from __future__ import annotations

import hashlib
import re

from mesh.inventory.model import Workload

MESH_ROOT = "/etc/mesh"
CA_PATH = f"{MESH_ROOT}/ca.pem"
FIREWALL_PATH = f"{MESH_ROOT}/firewall.nft"
ENVOY_BINARY = "/usr/local/lib/mesh/envoy"
ENVOY_START = "/usr/local/lib/mesh/envoy-start"  # an xds proxy's start step (templates/host/envoy-start)
ENVOY_USER = "mesh-envoy"
NFT_BINARY = "/usr/sbin/nft"
FIREWALL_UNIT = "mesh-firewall.service"
SYSTEMD_DIR = "/etc/systemd/system"


def proxy_name(workload: Workload) -> str:
    """`<service>-<key>`, unique among the proxies of one host and stable when the host's `mesh_workloads` are
    reordered: the key is what identifies the workload on its host (Workload.key: the app port on a VM, the
    app container on a container host), never its position in the list."""
    return f"{workload.service}-{workload.key}"


ENVOY_USER_PREFIX = "mesh-"
MAX_USER_NAME = 32  # useradd's limit


def envoy_user(proxy: str) -> str:
    """The system user one proxy's Envoy runs as on a VM (each proxy its own, so no Envoy reads another's key):
    `mesh-<proxy>` when that is a valid user name of at most 32 characters, else `mesh-<start>-<hash>` built from
    the proxy name (lower-cased, other characters replaced), the hash keeping distinct proxies distinct."""
    plain = ENVOY_USER_PREFIX + proxy
    if len(plain) <= MAX_USER_NAME and re.fullmatch(r"[a-z][-a-z0-9_]*", plain):
        return plain
    digest = hashlib.sha256(proxy.encode()).hexdigest()[:10]
    start = re.sub(r"[^a-z0-9]+", "-", proxy.lower()).strip("-")
    start = start[: MAX_USER_NAME - len(ENVOY_USER_PREFIX) - len(digest) - 1].rstrip("-")
    return f"{ENVOY_USER_PREFIX}{start}-{digest}" if start else f"{ENVOY_USER_PREFIX}{digest}"


def proxy_dir(proxy: str) -> str:
    return f"{MESH_ROOT}/proxies/{proxy}"


def tls_link(proxy: str) -> str:
    """The symlink naming the proxy's current key and certificate folder (`tls -> tls.<version>`): a new key
    and its certificate are written into a new folder and the link replaced in one rename, so Envoy never
    reads a key with another key's certificate (the `..data` pattern of Kubernetes volumes)."""
    return f"{proxy_dir(proxy)}/tls"


def tls_version_dir(proxy: str, version: str) -> str:
    """One key-and-certificate folder; the link points to it by the relative name (the same in a sidecar)."""
    return f"{proxy_dir(proxy)}/{TLS_VERSION_PREFIX}{version}"


TLS_VERSION_PREFIX = "tls."


def key_path(proxy: str) -> str:
    return f"{tls_link(proxy)}/key.pem"


def cert_path(proxy: str) -> str:
    """The leaf and its intermediate (the chain Envoy presents)."""
    return f"{tls_link(proxy)}/cert.pem"


def admin_dir(proxy: str) -> str:
    """The folder of Envoy's admin socket: owned by Envoy's user, 0700 (root connects; nobody else can), the
    only path the unit (or the sidecar's mount) lets Envoy write."""
    return f"{proxy_dir(proxy)}/admin"


def admin_socket_path(proxy: str) -> str:
    """Envoy's admin API, a unix socket (no TCP port: nothing sharing the host or the namespace reaches it)."""
    return f"{admin_dir(proxy)}/admin.sock"


def csr_path(proxy: str) -> str:
    return f"{proxy_dir(proxy)}/csr.pem"


def envoy_config_path(proxy: str) -> str:
    return f"{proxy_dir(proxy)}/envoy.yaml"


def envoy_unit_name(proxy: str) -> str:
    return f"mesh-envoy-{proxy}.service"


def envoy_unit_path(proxy: str) -> str:
    return f"{SYSTEMD_DIR}/{envoy_unit_name(proxy)}"


def base_id(workload: Workload) -> int:
    """Envoy's --base-id: distinct per proxy on a host (its shared memory and domain socket names) and stable
    when workloads are reordered: the proxy's inbound port, unique on its host (INVENTORY.md)."""
    return workload.proxy_port


# --- a proxy's files as Envoy reads and reloads them (mesh.render.render_proxy_files) ---
# Everything a proxy reads lives in its folder, so that a sidecar needs that folder only (mounted whole, so
# renames are seen). Envoy watches xds/ (resources) and the proxy folder (the `tls` link and ca.pem): a change
# is a new file moved into place there, never a file written in place.
XDS_DIR_NAME = "xds"
PROXY_CA_NAME = "ca.pem"
STAGING_DIR_NAME = ".staging"


def xds_dir(proxy: str) -> str:
    """The folder of the proxy's resource files (listeners, routes, clusters, endpoints, secrets): Envoy
    re-reads them when a file is moved into it."""
    return f"{proxy_dir(proxy)}/{XDS_DIR_NAME}"


def proxy_ca_path(proxy: str) -> str:
    """The proxy's copy of the trust bundle (the mesh CA): replaced by a rename in the proxy folder, which
    Envoy watches."""
    return f"{proxy_dir(proxy)}/{PROXY_CA_NAME}"


def proxy_staging_dir(proxy: str) -> str:
    """Where new files of a proxy wait to be validated on the host before they are moved into place: inside
    the proxy folder (the same filesystem, so each move is one atomic rename; inside a sidecar's mount)."""
    return f"{proxy_dir(proxy)}/{STAGING_DIR_NAME}"
