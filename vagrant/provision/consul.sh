#!/bin/sh
# consul1: a Consul 1.8.7 server (UI on, HTTP API on the private network), from Debian bullseye's package
# fetched with a private apt configuration so the node's own sources stay as they are.
set -eu
ADDRESS="$1"
if ! command -v consul >/dev/null; then
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    work=$(mktemp -d)
    echo "deb $mirror bullseye main" > "$work/sources.list"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
    opts="-o Dir::Etc::SourceList=$work/sources.list -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists=$work/lists -o Dir::Cache=$work/cache -o Acquire::Languages=none
          -o APT::Sandbox::User=root -qq"
    apt-get $opts update
    (cd "$work" && apt-get $opts download consul)
    dpkg -x "$work"/consul_*.deb "$work/x"
    install -m 0755 "$work/x/usr/bin/consul" /usr/local/bin/consul
    rm -rf "$work"
fi
id consul >/dev/null 2>&1 || useradd --system --home-dir /var/lib/consul --shell /usr/sbin/nologin consul
install -d -o consul -g consul /var/lib/consul
cat > /etc/systemd/system/consul.service <<UNIT
[Unit]
Description=Consul server (mesh Vagrant lab)
After=network-online.target
Wants=network-online.target

[Service]
User=consul
ExecStart=/usr/local/bin/consul agent -server -bootstrap-expect=1 -ui -node=consul1 -data-dir=/var/lib/consul -bind=$ADDRESS -client=0.0.0.0
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now consul.service
