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


def key_path(proxy: str) -> str:
    return f"{proxy_dir(proxy)}/key.pem"


def cert_path(proxy: str) -> str:
    """The leaf and its intermediate (the chain Envoy presents)."""
    return f"{proxy_dir(proxy)}/cert.pem"


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
