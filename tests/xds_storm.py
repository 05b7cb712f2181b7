"""A reconnect storm for the ADS server's tests, run in a child process (its handshakes are not the server's CPU):
`python -m tests.xds_storm FILE` reads FILE (JSON: port, root_pem, server_name, clients: [{node_id, key_pem,
chain_pem}]), opens every client's mTLS channel and ADS stream at once (grpc.aio, one TCP connection each), sends
each one's first LDS request and waits for its first response; prints one JSON line: how many got one, the first
few errors and the seconds it took."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from mesh.render import LISTENER_TYPE

TIMEOUT_S = 45.0  # a few seconds on an idle machine; a loaded one (the lab, benches) is slower


async def first_response(port: int, root_pem: bytes, server_name: str, client: dict[str, str]) -> str:
    """The version of this client's first LDS response."""
    credentials = grpc.ssl_channel_credentials(root_pem, client["key_pem"].encode(), client["chain_pem"].encode())
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                       options=[("grpc.ssl_target_name_override", server_name)]) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        request = discovery_pb2.DiscoveryRequest(type_url=LISTENER_TYPE)
        request.node.id = client["node_id"]
        call = stub.StreamAggregatedResources(timeout=TIMEOUT_S)
        await call.write(request)
        response = await call.read()
        call.cancel()
        if response is grpc.aio.EOF:
            raise RuntimeError("the stream ended with no response")
        return str(response.version_info)


async def storm(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    results = await asyncio.gather(*(first_response(spec["port"], spec["root_pem"].encode(), spec["server_name"],
                                                    client) for client in spec["clients"]), return_exceptions=True)
    errors = [repr(result)[:300] for result in results if isinstance(result, BaseException)]
    return {"answered": len(results) - len(errors), "errors": errors[:5], "seconds": time.monotonic() - started}


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as handle:
        print(json.dumps(asyncio.run(storm(json.load(handle)))))
