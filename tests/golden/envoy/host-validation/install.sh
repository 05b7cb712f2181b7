# runuser -u mesh-web-8080 -- /usr/local/lib/mesh/envoy --mode validate -c /etc/mesh/proxies/web-8080/.staging/validate.yaml --disable-hot-restart --log-level error
set -u
admin=/etc/mesh/proxies/web-8080/admin/admin.sock
stats() { curl -sf --max-time 2 --unix-socket "$admin" "http://envoy/stats?filter=$1" 2>/dev/null; }
took() {
  found=$(stats "$1") || return 1
  if [ -n "$3" ] && [ -z "$found" ]; then :; elif ! printf '%s\n' "$found" | grep -qF -- "$2"; then return 1; fi
  stats warming | grep -qE ': [1-9]' && return 1
  return 0
}
wait_for() {
  [ "$live" = 1 ] || return 0
  i=0; until took "$@"; do i=$((i + 1)); if [ "$i" -ge 150 ]; then
    echo "proxy web-8080: Envoy did not take $4 within 15 s (it runs the files it took before; see its log)" >&2; exit 1; fi; sleep 0.1; done
}
live=0; curl -sf --max-time 2 --unix-socket "$admin" http://envoy/server_info 2>/dev/null | grep -q 13d3f177f7b45b7c9710ab7e6fe0cc3d21c5fc4b6fa5216773e0b31a5e3ca94c && live=1
[ -d /etc/mesh/proxies/web-8080/xds ] || mkdir -p -m 0755 /etc/mesh/proxies/web-8080/xds || exit 1
mv -f /etc/mesh/proxies/web-8080/.staging/xds/cds.yaml /etc/mesh/proxies/web-8080/xds/cds.yaml || exit 1
wait_for cluster_manager.cds.version_text 'cluster_manager.cds.version_text: "27a1ab6bcdbc0336298f47d9580b1ba3c8219e5d20f722d8d0a9d6853ec14bcd"' absent-ok cds.yaml
mv -f /etc/mesh/proxies/web-8080/.staging/xds/lds.yaml /etc/mesh/proxies/web-8080/xds/lds.yaml || exit 1
wait_for listener_manager.lds.version_text 'listener_manager.lds.version_text: "61ae16485914fb16c1483d031e4f65537c5c8c1210bbda973080094d673f5a26"' absent-ok lds.yaml
mv -f /etc/mesh/proxies/web-8080/.staging/xds/cds.yaml.next /etc/mesh/proxies/web-8080/xds/cds.yaml || exit 1
wait_for cluster_manager.cds.version_text 'cluster_manager.cds.version_text: "5bba77e96c1cdb5e09ecfdcb7ad2815eab4b3b8bee0d6a0b541ed57a27030305"' absent-ok cds.yaml
rm -rf -- /etc/mesh/proxies/web-8080/.staging
rm -f -- /etc/mesh/proxies/web-8080/xds/rds.outbound-report.yaml
