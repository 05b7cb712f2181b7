"""Traces: spans the proxies report (mesh's own collector on every controller), kept in a bounded ring and
answered through the controller's loopback API; `mesh trace` reads them (or rebuilds hops from access logs)."""
