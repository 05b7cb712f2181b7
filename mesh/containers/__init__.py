"""Container hosts: the sidecar image, sidecar containers beside the user's app containers, reachability rules.

It owns what mesh does on a Docker host (through the docker CLI only); it must not touch the app containers.
"""
