#!/bin/sh
# dock1: Docker, the demo app image (imported from a debootstrapped rootfs: no registry) and its containers.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
systemctl enable --now docker.service
if ! docker image inspect mesh-demo-app:vagrant >/dev/null 2>&1; then
    rootfs=$(mktemp -d)
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    debootstrap --variant=minbase --include=python3 bookworm "$rootfs" "$mirror" >/dev/null
    install -D -m 0644 /tmp/mesh-demo/demoapp.py "$rootfs/opt/mesh-demo/demoapp.py"
    tar -C "$rootfs" --numeric-owner -c . | docker import - mesh-demo-app:vagrant
    rm -rf "$rootfs"
fi
sh /tmp/mesh-demo/containers.sh
