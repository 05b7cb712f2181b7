"""Consul's ACLs for the lab and for tests: the agent's ACL config, the policy mesh's token needs, and creating
that policy and token through Consul's HTTP API with the master token. Tokens travel in headers and files only.

It must not start Consul (layers.py writes the lab's unit, mesh/testing/consul_server.py runs a local one).
"""

from __future__ import annotations

import json
import os
import secrets
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

MESH_POLICY_NAME = "mesh"
# The least mesh needs (tried against Consul 1.8.7): register and deregister external nodes, their services and
# checks (node and service write); the checker's session and a deploy's (session write, on the agent's node), the
# checker's lock, the deploy lock (mesh/<mesh_id>/deploy/lock) and every KV key under mesh/ (key write). Reading
# /v1/acl/token/self needs no rule. `mesh lab up` applies it to a new lab and corrects it on a running one.
MESH_POLICY_RULES = """node_prefix "" { policy = "write" }
service_prefix "" { policy = "write" }
session_prefix "" { policy = "write" }
key_prefix "mesh/" { policy = "write" }
"""


def new_token() -> str:
    """A fresh secret in Consul's UUID form."""
    return str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))


def agent_acl_config(master_token: str) -> str:
    """The HCL of an agent with ACLs on and deny by default; the master token is also the agent's own token
    (a lab and a test agent only: it has no other identity to use)."""
    return (f'acl {{\n  enabled = true\n  default_policy = "deny"\n  down_policy = "extend-cache"\n'
            f'  tokens {{\n    master = "{master_token}"\n    agent = "{master_token}"\n  }}\n}}\n')


def write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read (created 0600, never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    temp.replace(path)


def ensure_secret(path: Path) -> str:
    """The token held in path, made (0600) when the file is missing."""
    if not path.exists():
        write_secret(path, new_token() + "\n")
    return path.read_text().strip()


def accessor_for(secret: str) -> str:
    """The AccessorID ensure_mesh_token gives the token with this secret: stable, so a second run finds it."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mesh-token:{secret}"))


class AclNotReady(RuntimeError):
    """Consul did not accept the master token or the policy in time."""


def ensure_mesh_token(url: str, master_token: str, mesh_token: str, timeout: float = 60.0,
                      ca_file: str | None = None) -> None:
    """Make (or correct) the policy `mesh` and a token with exactly that secret and policy. Retries while the
    ACL system is still starting (the leader creates the master token shortly after its election)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _ensure(url, master_token, mesh_token, ca_file)
            return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 401:  # "ACL support disabled"
                raise AclNotReady(f"Consul at {url} runs without ACLs (a lab made before they were on?)") from exc
            if time.monotonic() > deadline:
                raise AclNotReady(f"Consul at {url} did not take the mesh policy and token within {timeout:.0f} s: "
                                  f"{_reason(exc)}") from exc
            time.sleep(0.5)


def _ensure(url: str, master: str, secret: str, ca_file: str | None) -> None:
    _call(url, master, "GET", "/v1/acl/token/self", ca_file=ca_file)  # raises until the master token works
    policy = _call(url, master, "GET", f"/v1/acl/policy/name/{MESH_POLICY_NAME}", ca_file=ca_file, missing_ok=True)
    body = {"Name": MESH_POLICY_NAME, "Description": "mesh: catalog, checker sessions, KV under mesh/",
            "Rules": MESH_POLICY_RULES}
    if policy is None:
        _call(url, master, "PUT", "/v1/acl/policy", body, ca_file)
    elif policy.get("Rules") != MESH_POLICY_RULES:
        _call(url, master, "PUT", f"/v1/acl/policy/{policy['ID']}", body, ca_file)
    accessor = accessor_for(secret)
    token = {"AccessorID": accessor, "SecretID": secret, "Description": "mesh (deploy, status, checker)",
             "Policies": [{"Name": MESH_POLICY_NAME}]}
    found = _call(url, master, "GET", f"/v1/acl/token/{accessor}", ca_file=ca_file, missing_ok=True)
    if found is None:
        _call(url, master, "PUT", "/v1/acl/token", token, ca_file)
    elif [p.get("Name") for p in found.get("Policies") or []] != [MESH_POLICY_NAME]:
        _call(url, master, "PUT", f"/v1/acl/token/{accessor}", token, ca_file)


def _call(url: str, token: str, method: str, path: str, body: Any = None, ca_file: str | None = None,
          missing_ok: bool = False) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                     headers={"X-Consul-Token": token})
    context = None
    if url.startswith("https:"):
        import ssl

        context = ssl.create_default_context(cafile=ca_file)
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            return json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        if missing_ok and exc.code in (403, 404) and b"not found" in exc.read().lower():
            return None
        raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    reason = getattr(exc, "reason", exc)
    return str(reason).splitlines()[0] if str(reason) else type(exc).__name__
