"""mesh's central health checker: one leader at a time probes every instance through its Envoy into Consul.

Controllers run it from a small venv (py-consul, structlog): nothing here may import heavier parts of mesh.
"""
