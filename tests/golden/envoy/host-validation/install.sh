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
live=0; curl -sf --max-time 2 --unix-socket "$admin" http://envoy/server_info 2>/dev/null | grep -q 88331f61ccff314723094ee78a08f2d8be681bc844f7887975f6acc7963c482e && live=1
[ "$(head -c 16 "$(dirname "$admin")"/delivery 2>/dev/null)" = xds ] && live=0
[ -d /etc/mesh/proxies/web-8080/xds ] || mkdir -p -m 0755 /etc/mesh/proxies/web-8080/xds || exit 1
mv -f /etc/mesh/proxies/web-8080/.staging/xds/cds.yaml /etc/mesh/proxies/web-8080/xds/cds.yaml || exit 1
wait_for cluster_manager.cds.version_text 'cluster_manager.cds.version_text: "6549b3a0e6449868e54b9b122be9414e3584a92188d187702523342c14b9c559"' absent-ok cds.yaml
mv -f /etc/mesh/proxies/web-8080/.staging/xds/lds.yaml /etc/mesh/proxies/web-8080/xds/lds.yaml || exit 1
wait_for listener_manager.lds.version_text 'listener_manager.lds.version_text: "f81f1c0c0c95a69f8946ca445b68e5f8f437674c71b0de516d9f14724bd7e88b"' absent-ok lds.yaml
mv -f /etc/mesh/proxies/web-8080/.staging/xds/cds.yaml.next /etc/mesh/proxies/web-8080/xds/cds.yaml || exit 1
wait_for cluster_manager.cds.version_text 'cluster_manager.cds.version_text: "f0e6226c257ac417427c69362a01ad084fead511333396bc7c5a605490905fbf"' absent-ok cds.yaml
rm -rf -- /etc/mesh/proxies/web-8080/.staging
rm -f -- /etc/mesh/proxies/web-8080/xds/rds.outbound-report.yaml
