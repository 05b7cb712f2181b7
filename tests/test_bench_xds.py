"""bench/convergence --delivery xds's load generator (bench/xds_clients.py) against mesh's real ADS server fed by
the controller's XdsFeed (bench/xds_fleet.py), in-process and small: every simulated proxy reaches the versions
the server serves and ACKs them (after the NOT_FOUND of a stream opened before the server's first update: a
reconnect), an endpoint change reaches all, and a NACK is seen by the server."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from convergence_xds import TRUST_DOMAIN, _acked_eds, _synced, free_port, make_certs
from xds_clients import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    Generator,
)
from xds_fleet import FleetServer, node_id

PROXIES = 5


def _versions(fleet: FleetServer) -> dict[str, dict[str, str]]:
    return {node: dict(resources.versions) for node, resources in fleet.feed.served.items()}


def test_simulated_proxies_sync_ack_changes_and_nack(tmp_path: Path) -> None:
    root_pem, identities = make_certs(tmp_path, [node_id(i) for i in range(PROXIES)])
    port = free_port()
    fleet = FleetServer(tmp_path, port, PROXIES, 20, TRUST_DOMAIN)
    fleet.start()
    try:
        fleet.apply(0, time.monotonic())
        asyncio.run(asyncio.wait_for(_scenario(fleet, identities, root_pem, port), timeout=8))
    finally:
        fleet.stop()


async def _scenario(fleet: FleetServer, identities: list, root_pem: bytes, port: int) -> None:  # type: ignore[type-arg]
    generator = Generator(identities, f"127.0.0.1:{port}", root_pem, f"controller.{TRUST_DOMAIN}")
    await generator.start()
    try:
        expected = _versions(fleet)
        behind = await generator.wait_for(_synced(expected), timeout=5)
        assert behind == [], [(p.node_id, p.ends) for p in behind]
        for proxy in generator.proxies:
            for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE):
                assert proxy.acked(type_url) == expected[proxy.node_id][type_url], type_url
            served = fleet.feed.served[proxy.node_id]
            # EDS names from the clusters, RDS names from the listeners: exactly what the server has for the node
            assert proxy.types[ENDPOINT_TYPE].names == set(served.names(ENDPOINT_TYPE))
            assert proxy.types[ROUTE_TYPE].names == set(served.names(ROUTE_TYPE))

        nacking = generator.proxies[0]
        before = nacking.acked(ENDPOINT_TYPE)
        nacking.nack.add(ENDPOINT_TYPE)
        fleet.apply(1, time.monotonic())  # one instance of api drained: a new EDS version for every proxy
        changed = _versions(fleet)
        assert all(changed[node][ENDPOINT_TYPE] != expected[node][ENDPOINT_TYPE] for node in changed)
        acked = _acked_eds(changed)
        refused = changed[nacking.node_id][ENDPOINT_TYPE]
        behind = await generator.wait_for(
            lambda proxy: refused in proxy.types[ENDPOINT_TYPE].nacked if proxy is nacking else acked(proxy), timeout=5)
        assert behind == []
        assert nacking.acked(ENDPOINT_TYPE) == before  # a NACK keeps the last good version, as Envoy does

        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            shown = {t.type: t for t in fleet.feed.status()[nacking.node_id].types}
            if shown["EDS"].state == "nacked":
                break
            await asyncio.sleep(0.05)
        assert shown["EDS"].state == "nacked" and "refuses EDS" in (shown["EDS"].error or "")
        others = {t.type: t.state for t in fleet.feed.status()[generator.proxies[1].node_id].types}
        assert others["EDS"] == "synced" and others["CDS"] == "synced"
    finally:
        await generator.stop()
