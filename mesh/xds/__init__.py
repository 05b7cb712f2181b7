"""Delivery over xDS: the controllers stream each proxy's resources over ADS (gRPC, mTLS).

resources (files -> protobuf Anys, pure), sotw (one stream's state of the world protocol, pure), server (the gRPC
server: TLS, identity, streams, pushes), status (what a controller publishes of its streams, and the merge).
"""
