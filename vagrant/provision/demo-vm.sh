#!/bin/sh
# A VM: the demo app as systemd services (the units in vagrant/demo/<host>/, rendered by mesh.lab.demo_units).
set -eu
install -D -m 0644 /tmp/mesh-demo/demoapp.py /opt/mesh-demo/demoapp.py
for unit in /tmp/mesh-demo/units/*.service; do
    install -m 0644 "$unit" /etc/systemd/system/
done
systemctl daemon-reload
for unit in /tmp/mesh-demo/units/*.service; do
    systemctl enable --now "$(basename "$unit")"
    systemctl restart "$(basename "$unit")"
done
