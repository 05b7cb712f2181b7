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
live=0; curl -sf --max-time 2 --unix-socket "$admin" http://envoy/server_info 2>/dev/null | grep -q add2e960f58f03129f8d61739ea8a58394c175774133a4a215b9473ee129a6ba && live=1
[ -d /etc/mesh/proxies/web-8080/xds ] || mkdir -p -m 0755 /etc/mesh/proxies/web-8080/xds || exit 1
mv -f /etc/mesh/proxies/web-8080/.staging/xds/cds.yaml /etc/mesh/proxies/web-8080/xds/cds.yaml || exit 1
wait_for cluster_manager.cds.version_text 'cluster_manager.cds.version_text: "7f0ab74921de283620bf77644742feb4461e12d927478bdb95419d402cc9b6a5"' absent-ok cds.yaml
mv -f /etc/mesh/proxies/web-8080/.staging/xds/lds.yaml /etc/mesh/proxies/web-8080/xds/lds.yaml || exit 1
wait_for listener_manager.lds.version_text 'listener_manager.lds.version_text: "6fca64c70f55651d3edafe708c81e4ed2e17af58ae73f1f4b9b448eaca410311"' absent-ok lds.yaml
mv -f /etc/mesh/proxies/web-8080/.staging/xds/cds.yaml.next /etc/mesh/proxies/web-8080/xds/cds.yaml || exit 1
wait_for cluster_manager.cds.version_text 'cluster_manager.cds.version_text: "ff9767aac9a739acb4f45985fbd4a00c2db6cec572a67017ce117cc93b5ae1bf"' absent-ok cds.yaml
rm -rf -- /etc/mesh/proxies/web-8080/.staging
rm -f -- /etc/mesh/proxies/web-8080/xds/rds.outbound-report.yaml
