"""Pure desired-state computation: per-proxy Envoy resources (listeners, clusters, endpoints, secrets).

It knows nothing of SSH, Consul's HTTP or gRPC; rendering is mesh.render, pre-flight checks validate.py.
"""

from mesh.config.compute import compute_proxy_config, health_server_name
from mesh.config.consistent import consistent
from mesh.config.errors import ConfigError, EnvoyRejectedConfig, InconsistentConfig
from mesh.config.model import ProxyConfig

__all__ = ["ConfigError", "EnvoyRejectedConfig", "InconsistentConfig", "ProxyConfig", "compute_proxy_config",
           "consistent", "health_server_name"]
