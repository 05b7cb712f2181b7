"""What a proxy reports about the traffic it carries: stat names and the tags Prometheus labels come from, and the
fields of its JSON access log lines (design19 3.1, 3.3). Pure.

It owns these names and formats so that config, the golden files and every reader agree; it must not render text.
"""

from __future__ import annotations

from mesh.config.model import AccessLog, LogValue, RbacFilter, StatsTag
from mesh.inventory.model import Protocol

ACCESS_MARKER = "access"  # the `mesh` field of every access line: what readers filter on
SOURCE_SERVICE_HEADER = "x-mesh-source-service"
SOURCE_VERSION_HEADER = "x-mesh-source-version"
SOURCE_INSTANCE_HEADER = "x-mesh-source-instance"
CLIENT_CERT_HEADER = "x-forwarded-client-cert"
ENDPOINT_METADATA_NAMESPACE = "mesh"  # filter_metadata key of every upstream lb_endpoint
# The inbound app chain's RBAC filters (HTTP filters, or network filters), DENY first. Both write their dynamic
# metadata into one namespace (envoy.filters.{http,network}.rbac), keyed by their prefix:
# `<prefix>shadow_effective_policy_id`, `<prefix>shadow_engine_result` (HTTP also `<prefix>enforced_...`).
# HTTP stats: http.<inbound stat prefix>.rbac.<prefix>{allowed,denied,shadow_allowed,shadow_denied}; TCP stats:
# <tcp_stat_prefix>rbac.{allowed,denied} and <tcp_stat_prefix>rbac.<prefix>shadow_{allowed,denied}.
DENY_FILTER = RbacFilter("mesh.authz.deny", "DENY", "mesh_authz_deny_", "mesh_authz_deny.")
ALLOW_FILTER = RbacFilter("mesh.authz.allow", "ALLOW", "mesh_authz_allow_", "mesh_authz_allow.")
AUTHZ_FILTERS = (DENY_FILTER, ALLOW_FILTER)

# Stat names mesh composes: `outbound|S|V|D` (caller S at version V, upstream D; a version cluster of D's at DV:
# `outbound|S|V|D|DV`), `inbound|D|W` (callee D at W).
# Envoy splits stat names on dots, so a version's '.' is written '_'; service names are DNS labels (no '|' or '.').
_PART = r"[^|.]+"
_OUT = r"(?:cluster|http|tcp)\.outbound\|"
_IN = r"(?:cluster|http|tcp|vhost)\.inbound\|"
STATS_TAGS = (
    StatsTag("source_service", rf"^(?:{_OUT}|vhost\.inbound\|{_PART}\|{_PART}\.vcluster\.)({_PART})[|.]"),
    StatsTag("source_version", rf"^{_OUT}{_PART}\|({_PART})\|"),
    StatsTag("destination_service", rf"^(?:{_OUT}{_PART}\|{_PART}\||{_IN})({_PART})[|.]"),
    StatsTag("destination_version", rf"^(?:{_IN}{_PART}\||{_OUT}{_PART}\|{_PART}\|{_PART}\|)({_PART})\."),
)


def stat_version(version: str) -> str:
    return version.replace(".", "_")


def outbound_stat_name(service: str, version: str, upstream: str, upstream_version: str | None = None) -> str:
    """The caller side of an edge: the upstream cluster's alt_stat_name and the outbound HCM's or tcp_proxy's
    stat_prefix; with upstream_version, the alt_stat_name of the cluster of that version of the upstream."""
    name = f"outbound|{service}|{stat_version(version)}|{upstream}"
    return name if upstream_version is None else f"{name}|{stat_version(upstream_version)}"


def inbound_stat_name(service: str, version: str) -> str:
    """The callee side: the local app cluster's alt_stat_name, the inbound app chain's stat_prefix and the name of
    its route's virtual host."""
    return f"inbound|{service}|{stat_version(version)}"


_HTTP_FIELDS: tuple[tuple[str, str], ...] = (
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("status", "%RESPONSE_CODE%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("trace_id", "%TRACE_ID%"),  # null when the connection manager has no tracer (mesh_tracing unset)
)
_CONNECTION_FIELDS: tuple[tuple[str, str], ...] = (
    ("source_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration_ms", "%DURATION%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("connection_termination_details", "%CONNECTION_TERMINATION_DETAILS%"),
    ("upstream_transport_failure_reason", "%UPSTREAM_TRANSPORT_FAILURE_REASON%"),
)


def _request_header(name: str) -> str:
    return f"%REQ({name.upper()})%"


def _upstream_host_metadata(key: str) -> str:
    return f"%METADATA(UPSTREAM_HOST:{ENDPOINT_METADATA_NAMESPACE}:{key})%"


def _line(proxy: str, direction: str, protocol: Protocol, identity: tuple[tuple[str, str], ...], mtls: bool,
          extra: tuple[tuple[str, LogValue], ...] = ()) -> AccessLog:
    head: tuple[tuple[str, LogValue], ...] = (
        ("mesh", ACCESS_MARKER),
        ("time", "%START_TIME(%Y-%m-%dT%H:%M:%S.%6fZ)%"),
        ("proxy", proxy),
        ("direction", direction),
        ("protocol", protocol),
    )
    http = _HTTP_FIELDS if protocol != "tcp" else ()
    return AccessLog((*head, *identity, *_CONNECTION_FIELDS, ("mtls", mtls), *http, *extra))


def authz_shadow(protocol: Protocol) -> tuple[tuple[str, str], ...]:
    """The `authz_shadow` object of an inbound line: what the shadow rules would have done, from the RBAC filters'
    dynamic metadata. `deny`: the shadow deny entry that would deny (the smallest name when several would; null
    when none would); `allow`: `denied` when the allow entries with the shadow allow rules enforced would deny
    (rule `none`), `allowed`, or null (no shadow allow rule, or the DENY filter denied first)."""
    namespace = "envoy.filters.network.rbac" if protocol == "tcp" else "envoy.filters.http.rbac"
    deny, allow = DENY_FILTER.prefix, ALLOW_FILTER.prefix
    return (("deny", f"%DYNAMIC_METADATA({namespace}:{deny}shadow_effective_policy_id)%"),
            ("allow", f"%DYNAMIC_METADATA({namespace}:{allow}shadow_engine_result)%"))


def inbound_access_log(proxy: str, protocol: Protocol, spiffe_id: str, service: str, version: str,
                       mtls: bool = True) -> AccessLog:
    """The callee's line: the peer's id from its certificate; on HTTP the caller's service, version and instance
    from the headers the caller's Envoy set (outbound_request_headers); on TCP they are not known. A denial's rule
    is in response_code_details (HTTP) or connection_termination_details (TCP); the shadow rules' verdict in
    `authz_shadow`. mtls=False: the plaintext chain's line (a permissive service)."""
    callers = () if protocol == "tcp" else (
        ("source_service", _request_header(SOURCE_SERVICE_HEADER)),
        ("source_version", _request_header(SOURCE_VERSION_HEADER)),
        ("source_instance", _request_header(SOURCE_INSTANCE_HEADER)),
    )
    identity = (
        ("source_identity", "%DOWNSTREAM_PEER_URI_SAN%"),
        ("destination_identity", spiffe_id),
        *callers,
        ("destination_service", service),
        ("destination_version", version),
        ("destination_instance", proxy),
    )
    return _line(proxy, "inbound", protocol, identity, mtls=mtls, extra=(("authz_shadow", authz_shadow(protocol)),))


def outbound_access_log(proxy: str, protocol: Protocol, spiffe_id: str, service: str, version: str,
                        upstream: str) -> AccessLog:
    """The caller's line: the callee's id from its certificate, its version and instance from the chosen
    endpoint's metadata."""
    identity = (
        ("source_identity", spiffe_id),
        ("destination_identity", "%UPSTREAM_PEER_URI_SAN%"),
        ("source_service", service),
        ("source_version", version),
        ("source_instance", proxy),
        ("destination_service", upstream),
        ("destination_version", _upstream_host_metadata("version")),
        ("destination_instance", _upstream_host_metadata("instance")),
    )
    return _line(proxy, "outbound", protocol, identity, mtls=True)


def outbound_request_headers(service: str, version: str, proxy: str) -> tuple[tuple[str, str], ...]:
    """What the caller's Envoy writes on every outbound HTTP request (overwriting the app's): the callee's access
    line reads them."""
    return ((SOURCE_SERVICE_HEADER, service), (SOURCE_VERSION_HEADER, version), (SOURCE_INSTANCE_HEADER, proxy))
