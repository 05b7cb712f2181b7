#!/bin/sh
# mesh-sidecars: a sidecar joined with --network container:APP keeps the app's old network namespace when the
# app restarts, and the app may come back with a new address and a new namespace without mesh's chain closing
# its port. At start and on every start of an app container listed in /etc/mesh/sidecars.list, restart its sidecar
# unless it already shares the app's namespace, and re-apply the reachability rules (/etc/mesh/sidecar-rules.sh: the
# host's chains and the chain in each app's namespace). Rendered by mesh; do not edit.
set -u
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LIST=/etc/mesh/sidecars.list
RULES=/etc/mesh/sidecar-rules.sh

log() { echo "mesh-sidecars: $*" >&2; }

# The network namespace of a running container, or nothing.
netns_of() {
    pid=$(docker container inspect -f '{{.State.Pid}}' "$1" 2>/dev/null) || return 1
    [ "${pid:-0}" -gt 0 ] 2>/dev/null || return 1
    readlink "/proc/$pid/ns/net"
}

sidecars_of() { awk -v app="$1" '!/^#/ && $1 == app { print $2 }' "$LIST" 2>/dev/null; }

apps() { awk '!/^#/ && NF >= 3 { print $1 }' "$LIST" 2>/dev/null | sort -u; }

sync_app() {
    for sidecar in $(sidecars_of "$1"); do
        if ! app_ns=$(netns_of "$1"); then
            log "app container $1 is not running: $sidecar left as it is"
            continue
        fi
        [ "$(netns_of "$sidecar" || true)" = "$app_ns" ] && continue
        if docker restart --time 5 "$sidecar" >/dev/null; then
            log "restarted $sidecar into the network namespace of $1"
        else
            log "could not restart $sidecar (app container $1)"
        fi
    done
}

apply_rules() { "$RULES" apply || log "applying the reachability rules failed"; }

# The rules first: a restarted app listens in a new namespace where its port is open until they are applied
# (restarting a sidecar takes seconds).
since=$(date +%s)
apply_rules
for app in $(apps); do sync_app "$app"; done
# --since replays starts that happened while the loop above ran.
docker events --since "$since" --filter type=container --filter event=start --format '{{.Actor.Attributes.name}}' |
    while read -r name; do
        [ -n "$(sidecars_of "$name")" ] || continue
        apply_rules
        sync_app "$name"
    done
log "docker events ended: exiting (systemd starts the watcher again)"
exit 1
