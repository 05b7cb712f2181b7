"""Delivery over xDS (ADS over gRPC): the fixed names and numbers the plan, the proxies' start step, the hosts'
mesh-ctl and the controllers' ADS server share. Pure: no I/O.

A proxy on a host with `mesh_delivery: xds` has two bootstraps: `envoy.yaml` (every resource from the files
in xds/, the last-known-good config the controllers keep fresh at a slow pace) and `envoy-ads.yaml` (everything
but its own certificate streamed by the controllers). Its start step picks the ADS one when a controller answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Delivery = Literal["files", "xds"]
DELIVERIES: tuple[Delivery, ...] = ("files", "xds")

XDS_PORT = 15012  # every controller serves ADS (gRPC over mTLS) here; nft opens it to the mesh's hosts only
XDS_CLUSTER = "mesh-xds"  # the ADS bootstrap's static cluster: one endpoint per controller
ADS_BOOTSTRAP_NAME = "envoy-ads.yaml"  # beside envoy.yaml in the proxy folder of an xds proxy
DELIVERY_MARKER = "delivery"  # <proxy folder>/admin/delivery: `xds` or `files`, what the running Envoy started with
CONTROLLERS_COMMENT = "# mesh-xds-controllers:"  # envoy-ads.yaml's first line: the address:port pairs probed
METADATA_DELIVERY_KEY = "mesh_delivery"  # node.metadata of the ADS bootstrap: `xds`
START_PROBE_TIMEOUT_S = 1  # the start step's TCP connect timeout per controller
MAX_CONNECTION_AGE_S = 300  # the server closes a stream's connection this old: streams rebalance over controllers
MAX_CONNECTION_AGE_GRACE_S = 30
FILES_QUIET_S = 10.0  # an xds proxy's last-known-good files are rewritten once its snapshot is this quiet...
FILES_MAX_DELAY_S = 60.0  # ...or at least this often while it keeps changing


def ads_source() -> dict[str, Any]:
    """The ConfigSource of a resource streamed over the ADS stream (a fresh dict: callers may nest it)."""
    return {"ads": {}, "resource_api_version": "V3"}


@dataclass(frozen=True)
class XdsBootstrap:
    """Where an xds proxy's ADS stream goes: every controller at `port`, checked by SNI `server_name` and the
    controllers' SPIFFE ID."""

    controllers: tuple[str, ...]  # addresses (IP literals or names), deduplicated, in inventory order
    port: int
    server_name: str  # controller.<trust domain> (mesh.config.tracing.CONTROLLER_SERVER_NAME)
    controller_spiffe_id: str
