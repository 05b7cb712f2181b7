"""The dashboard: served by every controller on its loopback (server.py, gather.py, view.py, static/index.html),
opened through an SSH tunnel by `mesh dashboard` (command.py)."""
