#!/bin/sh
# mesh: makes each sidecar's proxy_port on dock1 reachable on the host's own addresses, and nothing else
# of the containers. Rendered by mesh; do not edit. Only mesh's chains are touched:
#   nat    MESH-SIDECARS (jumped from PREROUTING for local destinations): DNAT to the app container
#   filter MESH-SIDECARS-FWD (jumped from DOCKER-USER): ACCEPT exactly those DNAT'd destinations
# Usage: /etc/mesh/sidecar-rules.sh apply | check | remove   (check: exit 0 when the applied rules are current)
set -eu
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
NAT_CHAIN=MESH-SIDECARS
FWD_CHAIN=MESH-SIDECARS-FWD
STATE=/run/mesh/sidecar-rules.applied
LOCK=/run/mesh/sidecar-rules.lock
# app container, proxy_port
ENTRIES='api-v2-1 21000
api-v2-2 21005
'

container_ip() {
    docker container inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$1" 2>/dev/null \
        | awk '{ print $1 }'
}

# The iptables-restore input for mesh's chains, with each app container's address as of now.
desired() {
    nat="" fwd=""
    while read -r app port; do
        [ -n "$app" ] || continue
        ip=$(container_ip "$app")
        if [ -z "$ip" ]; then
            echo "sidecar-rules: container $app is not running: port $port is not forwarded" >&2
            continue
        fi
        nat="$nat-A $NAT_CHAIN -p tcp -m tcp --dport $port -j DNAT --to-destination $ip:$port
"
        fwd="$fwd-A $FWD_CHAIN -d $ip/32 -p tcp -m tcp --dport $port -m conntrack --ctstate DNAT -j ACCEPT
"
    done <<ENTRIES_END
$ENTRIES
ENTRIES_END
    # Traffic from the containers' own bridges is not the lab-facing side: it is never redirected.
    printf '*nat\n:%s - [0:0]\n-A %s -i docker+ -j RETURN\n-A %s -i br-+ -j RETURN\n%sCOMMIT\n' \
        "$NAT_CHAIN" "$NAT_CHAIN" "$NAT_CHAIN" "$nat"
    printf '*filter\n:%s - [0:0]\n%sCOMMIT\n' "$FWD_CHAIN" "$fwd"
}

jumps_present() {
    iptables -w -t nat -C PREROUTING -m addrtype --dst-type LOCAL -j "$NAT_CHAIN" 2>/dev/null &&
        iptables -w -t filter -C DOCKER-USER -j "$FWD_CHAIN" 2>/dev/null
}

apply() {
    rules=$(desired)
    # Declared chains are created or flushed and refilled in one commit per table; other chains stay as they are.
    printf '%s\n' "$rules" | iptables-restore -w --noflush
    iptables -w -t nat -C PREROUTING -m addrtype --dst-type LOCAL -j "$NAT_CHAIN" 2>/dev/null ||
        iptables -w -t nat -I PREROUTING 1 -m addrtype --dst-type LOCAL -j "$NAT_CHAIN"
    iptables -w -t filter -N DOCKER-USER 2>/dev/null || true  # Docker makes it too, and jumps to it first
    iptables -w -t filter -C DOCKER-USER -j "$FWD_CHAIN" 2>/dev/null ||
        iptables -w -t filter -I DOCKER-USER 1 -j "$FWD_CHAIN"
    printf '%s\n' "$rules" > "$STATE"
}

check() {
    [ -f "$STATE" ] && jumps_present || return 1
    [ "$(desired)" = "$(cat "$STATE")" ] || return 1
    # Someone may have flushed a chain by hand since: count its rules against the applied ones.
    want_nat=$(grep -c "^-A $NAT_CHAIN " "$STATE" || true)
    have_nat=$(iptables -w -t nat -S "$NAT_CHAIN" 2>/dev/null | grep -c "^-A " || true)
    want_fwd=$(grep -c "^-A $FWD_CHAIN " "$STATE" || true)
    have_fwd=$(iptables -w -t filter -S "$FWD_CHAIN" 2>/dev/null | grep -c "^-A " || true)
    [ "$want_nat" = "$have_nat" ] && [ "$want_fwd" = "$have_fwd" ]
}

remove() {
    while iptables -w -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j "$NAT_CHAIN" 2>/dev/null; do :; done
    while iptables -w -t filter -D DOCKER-USER -j "$FWD_CHAIN" 2>/dev/null; do :; done
    iptables -w -t nat -F "$NAT_CHAIN" 2>/dev/null && iptables -w -t nat -X "$NAT_CHAIN"
    iptables -w -t filter -F "$FWD_CHAIN" 2>/dev/null && iptables -w -t filter -X "$FWD_CHAIN"
    rm -f "$STATE"
}

# The watcher and a deploy may apply at the same moment: one at a time, or both would add the jumps.
mkdir -p "$(dirname "$LOCK")"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$LOCK"
    flock 9
fi

case "${1:-apply}" in
    apply) apply ;;
    check) check ;;
    remove) remove ;;
    *) echo "usage: $0 apply|check|remove" >&2; exit 64 ;;
esac
