"""The hosts layer: how mesh reaches a managed host (the connector interface, SSH, local) and the facts it
reads there. deploy, containers, status and the controller use it; it must not know about tasks or plays.
"""
