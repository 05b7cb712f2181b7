"""The consistency check of a proxy config, as go-control-plane's Snapshot.Consistent(): refuse dangling names.

It reads a ProxyConfig and raises; it must not repair or render anything.
"""

from __future__ import annotations

from collections import Counter

from mesh.config.errors import InconsistentConfig
from mesh.config.model import ProxyConfig


def consistent(cfg: ProxyConfig) -> None:
    """Raise InconsistentConfig unless every cluster and secret a listener or cluster names is present."""
    problems = _duplicates(cfg) + _dangling_clusters(cfg) + _dangling_secrets(cfg) + _route_names(cfg)
    if problems:
        raise InconsistentConfig(cfg.proxy, "; ".join(problems))


def _duplicates(cfg: ProxyConfig) -> list[str]:
    metrics = [cfg.metrics] if cfg.metrics is not None else []
    names = [
        *(f"listener {n!r}" for n in [cfg.inbound.name, *(o.name for o in cfg.outbound), *(m.name for m in metrics)]),
        *(f"cluster {c.name!r}" for c in cfg.clusters),
        *(f"cluster {m.admin_cluster!r}" for m in metrics),
        *([f"cluster {cfg.tracer.cluster!r}"] if cfg.tracer is not None else []),
    ]
    ports = [f"port {p}" for p in [cfg.inbound.port, *(o.port for o in cfg.outbound), *(m.port for m in metrics)]]
    return [f"{name} appears {count} times" for name, count in Counter(names + ports).items() if count > 1]


def _dangling_clusters(cfg: ProxyConfig) -> list[str]:
    present = {cluster.name for cluster in cfg.clusters}
    wanted = [(cfg.inbound.name, cfg.inbound.cluster), (f"{cfg.inbound.name} health chain", cfg.inbound.health.cluster),
              *((listener.name, listener.cluster) for listener in cfg.outbound),
              *((f"route {listener.route.name!r}", name) for listener in cfg.outbound if listener.route is not None
                for name in listener.route.cluster_names)]
    return [f"{owner} names cluster {name!r}, which is not in this config"
            for owner, name in wanted if name not in present]


def _dangling_secrets(cfg: ProxyConfig) -> list[str]:
    certificates = {cfg.secrets.certificate.name}
    bundles = {cfg.secrets.trust_bundle.name}
    tls = [(cfg.inbound.name, cfg.inbound.tls.certificate_secret, cfg.inbound.tls.trust_bundle_secret)]
    tls += [(cluster.name, cluster.tls.certificate_secret, cluster.tls.trust_bundle_secret)
            for cluster in cfg.clusters if cluster.tls is not None]
    if cfg.tracer is not None and cfg.tracer.mesh_tls is not None:
        tls.append((cfg.tracer.cluster, cfg.tracer.mesh_tls.certificate_secret, cfg.tracer.mesh_tls.trust_bundle_secret))
    problems = []
    for owner, certificate, bundle in tls:
        if certificate not in certificates:
            problems.append(f"{owner} names certificate secret {certificate!r}, which is not in this config")
        if bundle not in bundles:
            problems.append(f"{owner} names trust bundle secret {bundle!r}, which is not in this config")
    return problems


def _route_names(cfg: ProxyConfig) -> list[str]:
    """An HTTP listener (outbound, or the inbound app chain) reads the route named as itself: its route must be named
    so, and be there; a TCP one has none."""
    found = [f"listener {listener.name!r} has no route" if listener.route is None else
             f"listener {listener.name!r} reads route {listener.name!r}, not {listener.route.name!r}"
             for listener in cfg.outbound
             if listener.http and (listener.route is None or listener.route.name != listener.name)]
    inbound = cfg.inbound
    if inbound.http and (inbound.route is None or inbound.route.name != inbound.name):
        found.append(f"listener {inbound.name!r} reads route {inbound.name!r}, not "
                     f"{inbound.route.name if inbound.route else None!r}")
    if not inbound.http and inbound.route is not None:
        found.append(f"TCP listener {inbound.name!r} has a route")
    return found
