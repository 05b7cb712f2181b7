"""The far ends of what `mesh_services` accepts (largest counts and durations, 4-decimal percentages, every retry
condition, header and cookie names of every token character, quoted and backslashed values, odd version labels,
a regex near RE2's limits, TCP and gRPC services) make config the real Envoy accepts, for callers and callees:
what passes `mesh inventory check` does not fail later at deploy time."""

from __future__ import annotations

import datetime
import textwrap
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.config import compute_proxy_config
from mesh.inventory.loader import load_inventory
from mesh.inventory.validate import build_mesh
from mesh.render import render_proxy_files, validate_proxy_files

INVENTORY = """\
all:
  children:
    mesh_controllers: {hosts: {ctl1: {ansible_host: 10.0.0.3}}}
    vms:
      hosts:
        vm1:
          ansible_host: 10.0.0.11
          mesh_zone: z1
          mesh_region: r1
          mesh_workloads:
            - {service: web, port: 8080, upstreams: [{service: api, local_port: 19101}, {service: db, local_port: 19102}, {service: grpcsvc, local_port: 19103}]}
        vm2:
          ansible_host: 10.0.0.12
          mesh_zone: z2
          mesh_region: r1
          mesh_workloads:
            - {service: api, version: v1, port: 9090}
            - {service: api, version: v2.0_rc-1, port: 9091}
            - {service: db, port: 5432, protocol: tcp}
            - {service: grpcsvc, port: 7070, protocol: grpc}
"""
GROUP_VARS = r"""
mesh_consul_url: http://10.0.0.2:8500
mesh_services:
  api:
    lb: {policy: maglev, hash_on: {cookie: "Sess!on#1"}}
    timeout: 24h
    retries: {attempts: 100, per_try_timeout: 1ms, on: "5xx,gateway-error,reset,reset-before-request,connect-failure,envoy-ratelimited,retriable-4xx,refused-stream,http3-post-connect-failure,cancelled,deadline-exceeded,internal,resource-exhausted,unavailable", backoff: {base: 1ms, max: 24h}}
    circuit_breaker: {max_connections: 4294967295, max_pending_requests: 1, max_requests: 4294967295, max_retries: 4294967295, retry_budget: 0.0001}
    outlier_detection: {consecutive_5xx: 4294967295, consecutive_gateway_failure: 1, interval: 1ms, base_ejection_time: 24h, max_ejection_percent: 0}
    routes:
      - match: {headers: {"X-Weird!#$%&'*+-.^_`|~": "a \"quoted\" \\ value ü"}, cookies: {"c!#$%&'*+-.^_`|~": "v!#$%&'()*+-./:<=>?@[]^_`{|}~"}, path: {regex: '(?i)[[:alpha:]]{10}x\.(?:a|b)*?\x41'}, method: CONNECT}
        to: {v1: 0, v2.0_rc-1: 100}
        timeout: 1ms
        retries: {attempts: 0}
      - match: {path: {prefix: "/#?x=\"y\\z"}}
        to: {v1: 100}
      - match: {path: {exact: "/a'b"}, method: patch}
        to: {v1: 1, v2.0_rc-1: 99}
    mirror: {to: v2.0_rc-1, percent: 99.9999}
    fault: {abort: {status: 200, percent: 0.0001}, delay: {duration: 24h, percent: 100}, when_headers: {x-test: "1", "X-Other": 0}}
    rate_limit: {requests_per_second: 1000000000, burst: 1000000000}
  db:
    lb: {policy: ring_hash, hash_on: source_ip}
    circuit_breaker: {retry_budget: 100}
    outlier_detection: {max_ejection_percent: 100}
  grpcsvc:
    retries: {attempts: 1, on: [unavailable]}
    fault: {abort: {status: 599}}
"""


def throwaway_ca() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "policy test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_extreme_accepted_policies_render_into_config_envoy_accepts(tmp_path: Path) -> None:
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "inventory.yml").write_text(INVENTORY)
    (tmp_path / "group_vars" / "all.yml").write_text(textwrap.dedent(GROUP_VARS).lstrip())
    path = str(tmp_path / "inventory.yml")
    mesh = build_mesh(load_inventory(path), path)
    assert mesh.policy("api").routes[0].match is not None and mesh.policy("api").fault is not None
    ca = throwaway_ca()
    for workload in mesh.workloads:
        files = render_proxy_files(compute_proxy_config(mesh, workload))
        validate_proxy_files(files, ca)  # raises EnvoyRejectedConfig with Envoy's reason
    caller = render_proxy_files(compute_proxy_config(mesh, mesh.workloads[0]))
    routes = next(file.content for file in caller.files if file.path.endswith("/rds.outbound-api.yaml"))
    assert "safe_regex" in routes and "request_mirror_policies" in routes and "weighted_clusters" in routes
