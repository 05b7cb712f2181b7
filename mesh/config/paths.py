"""Names and paths of a proxy on its managed host (design12): files under /etc/mesh, units, Envoy's binary.

It owns these strings so that config, render, deploy and status agree; it must not touch any file.
"""

from __future__ import annotations

from mesh.inventory.model import Workload

MESH_ROOT = "/etc/mesh"
CA_PATH = f"{MESH_ROOT}/ca.pem"
FIREWALL_PATH = f"{MESH_ROOT}/firewall.nft"
ENVOY_BINARY = "/usr/local/lib/mesh/envoy"
ENVOY_USER = "mesh-envoy"
NFT_BINARY = "/usr/sbin/nft"
FIREWALL_UNIT = "mesh-firewall.service"
SYSTEMD_DIR = "/etc/systemd/system"


def proxy_name(workload: Workload) -> str:
    """`<service>-<index>`: unique among the proxies of one host."""
    return f"{workload.service}-{workload.index}"


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
    """Envoy's --base-id: distinct per proxy on a host (its shared memory and domain socket names)."""
    return workload.index + 1
