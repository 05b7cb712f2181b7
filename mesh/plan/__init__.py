"""The deploy's plan: what every managed host must hold (files with mode, owner and content, users, units,
sidecars, the firewall, certificates) computed once, purely, before any host is touched (build.py); what a
host holds today (mesh.hosts.observe); and the difference, shown by `mesh plan` and applied by `mesh deploy`
(changes.py).
"""

from mesh.plan.model import HostPlan, Plan, PlannedFile, ProxyPlan

__all__ = ["HostPlan", "Plan", "PlannedFile", "ProxyPlan"]
