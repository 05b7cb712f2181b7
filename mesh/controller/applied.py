"""Which run-time override revision every proxy's files reflect: the published `traffic` and `authz` maps. Pure.

It owns the rule both share: a service's revision is published only once every file that carries it is, on its
host, the one the controller wants there; it must not know what the files hold or talk to Consul or hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from mesh.controller.protocol import relpath_in
from mesh.controller.spec import ControllerSpec, ProxySpec

Wanted = Mapping[tuple[str, str, str], str]  # (host, proxy, relpath) -> the sha256 the controller wants there
OnHosts = Mapping[tuple[str, str], Mapping[str, str] | None]  # (host, proxy) -> relpath -> sha256; None: unknown


def applied_revisions(spec: ControllerSpec, files_of: Callable[[ProxySpec], Iterable[tuple[str, str]]],
                      revision: Callable[[str], str], wanted: Wanted, on_hosts: OnHosts) -> dict[str, str]:
    """service -> revision(service) for each service some proxy's file carries (`files_of(proxy)`: its (path,
    service) pairs), left out while one of those files is not the wanted one on its host (a push pending or
    refused, a host not reached)."""
    pending: set[str] = set()
    services: set[str] = set()
    for host in spec.hosts:
        for proxy in host.proxies:
            have = on_hosts.get((host.name, proxy.name))
            for path, service in files_of(proxy):
                services.add(service)
                relpath = relpath_in(proxy.proxy_dir, path)
                digest = wanted.get((host.name, proxy.name, relpath))
                if have is None or digest is None or have.get(relpath) != digest:
                    pending.add(service)
    return {service: revision(service) for service in sorted(services - pending)}
