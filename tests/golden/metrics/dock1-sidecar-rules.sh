#!/bin/sh
# mesh: makes each sidecar's proxy_port and metrics_port reachable on the container host's own addresses (the
# metrics port from the metrics sources only), and nothing else of the containers, and closes each app's port to
# everything but its own sidecar. Rendered by mesh; do not edit.
# Only mesh's chains are touched:
#   nat    MESH-SIDECARS (jumped from PREROUTING for local destinations): DNAT to the app container
#   filter MESH-SIDECARS-FWD (jumped from DOCKER-USER): ACCEPT exactly those DNAT'd destinations (a metrics port
#          only from the metrics sources; DROP from any other)
#   filter MESH-APP inside each app container's network namespace (jumped from INPUT): the app's port(s)
#          from loopback only (its sidecar shares the namespace), the metrics port(s) from loopback and the
#          metrics sources; dropped from every other source. Bridge traffic between containers never passes
#          DOCKER-USER without br_netfilter, so only this closes them.
# Metrics sources (mesh_metrics_scrapers and the controllers): IPv4 and IPv6 addresses as written, host names
# resolved (IPv4, `getent ahostsv4`) each time the rules are computed: `check` fails when a name's addresses
# changed, and a name that does not resolve allows nothing.
# Usage: /etc/mesh/sidecar-rules.sh apply | check | remove   (check: exit 0 when the applied rules are current)
set -eu
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
NAT_CHAIN=MESH-SIDECARS
FWD_CHAIN=MESH-SIDECARS-FWD
APP_CHAIN=MESH-APP
STATE=/run/mesh/sidecar-rules.applied
APP_STATE=/run/mesh/sidecar-app-rules.applied
LOCK=/run/mesh/sidecar-rules.lock
# app container, proxy_port, metrics_port
ENTRIES='api-1 21000 20000
api-1 21001 20001
'
# app container, its app port(s), its metrics port(s) (comma-separated)
APP_PORTS='api-1 5432,9090 20000,20001
'
# who may reach the metrics ports: IPv4 addresses, IPv6 addresses, host names
SOURCES_V4='10.0.0.50 10.0.0.3'
SOURCES_V6='fd00::50'
SOURCE_NAMES='graf.golden.internal'

container_ip() {
    docker container inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$1" 2>/dev/null \
        | awk '{ print $1 }'
}

# The pid of a running container (its network namespace is /proc/PID/ns/net), or a failure.
container_pid() {
    pid=$(docker container inspect -f '{{.State.Pid}}' "$1" 2>/dev/null) || return 1
    [ "${pid:-0}" -gt 0 ] 2>/dev/null || return 1
    echo "$pid"
}

# The metrics sources of one IP version (4 or 6), one per line, first seen first: the addresses written, then
# (IPv4) the addresses the host names resolve to now.
sources() {
    if [ "$1" = 4 ]; then
        for source in $SOURCES_V4; do echo "$source"; done
        for name in $SOURCE_NAMES; do
            found=$(getent ahostsv4 "$name" | awk '{ print $1 }') || true
            if [ -n "$found" ]; then
                echo "$found"
            else
                echo "sidecar-rules: metrics source $name does not resolve: it is not allowed" >&2
            fi
        done
    else
        for source in $SOURCES_V6; do echo "$source"; done
    fi | awk '!seen[$0]++'
}

# The iptables-restore input for mesh's chains, with each app container's address as of now.
desired() {
    nat="" fwd=""
    allowed=$(sources 4)
    while read -r app port metrics; do
        [ -n "$app" ] || continue
        ip=$(container_ip "$app")
        if [ -z "$ip" ]; then
            echo "sidecar-rules: container $app is not running: ports $port, $metrics are not forwarded" >&2
            continue
        fi
        nat="$nat-A $NAT_CHAIN -p tcp -m tcp --dport $port -j DNAT --to-destination $ip:$port
-A $NAT_CHAIN -p tcp -m tcp --dport $metrics -j DNAT --to-destination $ip:$metrics
"
        fwd="$fwd-A $FWD_CHAIN -d $ip/32 -p tcp -m tcp --dport $port -m conntrack --ctstate DNAT -j ACCEPT
"
        for source in $allowed; do
            fwd="$fwd-A $FWD_CHAIN -s $source/32 -d $ip/32 -p tcp -m tcp --dport $metrics -m conntrack --ctstate DNAT -j ACCEPT
"
        done
        fwd="$fwd-A $FWD_CHAIN -d $ip/32 -p tcp -m tcp --dport $metrics -j DROP
"
    done <<ENTRIES_END
$ENTRIES
ENTRIES_END
    # Traffic from the containers' own bridges is not the lab-facing side: it is never redirected.
    printf '*nat\n:%s - [0:0]\n-A %s -i docker+ -j RETURN\n-A %s -i br-+ -j RETURN\n%sCOMMIT\n' \
        "$NAT_CHAIN" "$NAT_CHAIN" "$NAT_CHAIN" "$nat"
    printf '*filter\n:%s - [0:0]\n%sCOMMIT\n' "$FWD_CHAIN" "$fwd"
}

# The iptables-restore input of the app chain for tool (iptables or ip6tables), app ports and metrics ports
# (comma-separated): loopback returns to INPUT's other rules, and so do the metrics sources (of the tool's IP
# version) to the metrics ports; every other packet to those ports is dropped.
app_rules() {
    case "$1" in ip6tables) version=6 ;; *) version=4 ;; esac
    allowed=$(sources "$version")
    drops=""
    for port in $(echo "$3" | tr ',' ' '); do
        for source in $allowed; do
            drops="$drops-A $APP_CHAIN -s $source -p tcp -m tcp --dport $port -j RETURN
"
        done
        drops="$drops-A $APP_CHAIN -p tcp -m tcp --dport $port -j DROP
"
    done
    for port in $(echo "$2" | tr ',' ' '); do
        drops="$drops-A $APP_CHAIN -p tcp -m tcp --dport $port -j DROP
"
    done
    printf '*filter\n:%s - [0:0]\n-A %s -i lo -j RETURN\n%sCOMMIT\n' "$APP_CHAIN" "$APP_CHAIN" "$drops"
}

# A checksum of the app chain every IP version should hold now (a metrics source's addresses may change).
app_wanted() {
    for tool in $(families); do app_rules "$tool" "$1" "$2"; done | cksum | tr ' ' :
}

# The IP versions whose tools the host has: iptables always (a prerequisite), ip6tables when installed.
families() {
    echo iptables
    if command -v ip6tables-restore >/dev/null 2>&1; then echo ip6tables; fi
}

# The app chain and the jump to it in the namespace of pid, as listed (for `check` to compare); fails when
# either is missing.
app_listing() {
    for tool in $(families); do
        nsenter -t "$1" -n "$tool" -w -S "$APP_CHAIN" 2>/dev/null || return 1
        nsenter -t "$1" -n "$tool" -w -S INPUT 2>/dev/null | grep -x -- "-A INPUT -j $APP_CHAIN" || return 1
    done
}

# One line per guarded app that is running: app, namespace, ports, metrics ports, a checksum of the rules it
# should hold and one of its rules as listed (`missing` when its chain or the jump to it is not there).
app_state() {
    while read -r app ports metrics; do
        [ -n "$app" ] || continue
        pid=$(container_pid "$app") || continue
        if listing=$(app_listing "$pid"); then
            sum=$(printf '%s\n' "$listing" | cksum | tr ' ' :)
        else
            sum=missing
        fi
        echo "$app $(readlink "/proc/$pid/ns/net" || true) $ports $metrics $(app_wanted "$ports" "$metrics") $sum"
    done <<APP_PORTS_END
$APP_PORTS
APP_PORTS_END
}

apply_app() {
    app=$1 pid=$2 ports=$3 metrics=$4
    for tool in $(families); do
        app_rules "$tool" "$ports" "$metrics" | nsenter -t "$pid" -n "$tool-restore" -w --noflush || return 1
        nsenter -t "$pid" -n "$tool" -w -C INPUT -j "$APP_CHAIN" 2>/dev/null ||
            nsenter -t "$pid" -n "$tool" -w -I INPUT 1 -j "$APP_CHAIN" || return 1
    done
}

# Each running app's namespace gets its chain; an app that is not running gets it when it starts (the watcher).
apply_apps() {
    failed=0
    while read -r app ports metrics; do
        [ -n "$app" ] || continue
        if ! pid=$(container_pid "$app"); then
            echo "sidecar-rules: container $app is not running: its port(s) $ports are closed when it starts" >&2
            continue
        fi
        if ! apply_app "$app" "$pid" "$ports" "$metrics"; then
            echo "sidecar-rules: could not close port(s) $ports of container $app in its namespace" >&2
            failed=1
        fi
    done <<APP_PORTS_END
$APP_PORTS
APP_PORTS_END
    app_state > "$APP_STATE"
    return "$failed"
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
    apply_apps
}

check() {
    [ -f "$STATE" ] && [ -f "$APP_STATE" ] && jumps_present || return 1
    [ "$(desired)" = "$(cat "$STATE")" ] || return 1
    # An app restarted since (a new namespace, no chain) or a chain changed by hand shows in its line.
    [ "$(app_state)" = "$(cat "$APP_STATE")" ] || return 1
    ! grep -q " missing$" "$APP_STATE" || return 1
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
    while read -r app _ports _metrics; do
        [ -n "$app" ] || continue
        pid=$(container_pid "$app") || continue
        for tool in $(families); do
            while nsenter -t "$pid" -n "$tool" -w -D INPUT -j "$APP_CHAIN" 2>/dev/null; do :; done
            nsenter -t "$pid" -n "$tool" -w -F "$APP_CHAIN" 2>/dev/null &&
                nsenter -t "$pid" -n "$tool" -w -X "$APP_CHAIN" || true
        done
    done <<APP_PORTS_END
$APP_PORTS
APP_PORTS_END
    rm -f "$STATE" "$APP_STATE"
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
