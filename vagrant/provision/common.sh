#!/bin/sh
# Every node: what mesh needs on a managed host (INVENTORY.md): openssl, nftables, python3 (Ansible, controllers).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends openssl nftables python3 curl ca-certificates >/dev/null
