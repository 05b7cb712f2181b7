"""Judging an xds proxy's delivery (mesh_delivery: xds): which bootstrap its Envoy runs, from /server_info's
node.metadata, and the ADS stream the controllers publish for its node id (mesh.status.controllers), with the
problems a user must see: a NACKed resource with Envoy's error, a proxy on ADS that no controller streams to, a
proxy started from its files. Pure: readings in, an XdsStatus and problems out; it must not read hosts or print.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from mesh.config.xds import METADATA_DELIVERY_KEY
from mesh.status.controllers import ControllerView
from mesh.status.report import Running, XdsStatus, XdsTypeStatus

ON_FILES_PROBLEM = ("runs from its files: no controller answered when its Envoy started (the controllers move it "
                    "back to ADS within a minute)")
ERROR_SHOWN_CHARS = 400  # of Envoy's NACK message in a problem line (the JSON has it whole)


def running_delivery(server_info: Mapping[str, Any] | None) -> Running | None:
    """`xds` when Envoy started from the ADS bootstrap (its node.metadata says mesh_delivery: xds), `files` when
    from envoy.yaml, None when the admin did not answer."""
    if server_info is None:
        return None
    node = server_info.get("node")
    metadata = node.get("metadata") if isinstance(node, dict) else None
    value = metadata.get(METADATA_DELIVERY_KEY) if isinstance(metadata, dict) else None
    return "xds" if value == "xds" else "files"


def judge_xds(node_id: str, server_info: Mapping[str, Any] | None, controllers: ControllerView | None) -> XdsStatus:
    """The delivery of the xds proxy `node_id`: what runs, and its stream (None controllers: not read)."""
    running = running_delivery(server_info)
    read = controllers is not None and controllers.xds_read
    stream = controllers.stream(node_id) if controllers is not None and read else None
    if stream is None:
        return XdsStatus(node_id, running, None, (), streams_read=read)
    return XdsStatus(node_id, running, stream.controller or None,
                     tuple(XdsTypeStatus(item.type, item.state, item.sent, item.acked, item.error)
                           for item in stream.types),
                     datetime.fromtimestamp(stream.connected_since, UTC), stream.peer or None)


def xds_problems(status: XdsStatus) -> list[str]:
    """Each NACKed type (`LDS NACKed (version 1a2b3c4d): <Envoy's error>`), a proxy on ADS with no stream, a proxy
    started from its files. A stale type is no problem (in flight); an Envoy whose admin does not answer is the
    Envoy's problem, not its stream's."""
    state = status.state
    if state == "on files":
        return [ON_FILES_PROBLEM]
    if state == "no stream" and status.running == "xds":
        return [f"runs on ADS but no controller publishes a stream for node {status.node_id}"]
    return [f"{item.type} NACKed (version {(item.sent or '?')[:8]}): {_one_line(item.error)}"
            for item in status.of_state("nacked")]


def _one_line(error: str | None) -> str:
    if not error:
        return "(no message)"
    text = " ".join(error.split())
    return text if len(text) <= ERROR_SHOWN_CHARS else text[:ERROR_SHOWN_CHARS] + "..."
