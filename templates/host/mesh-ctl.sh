#!/bin/sh
# mesh-ctl: the only command a mesh controller can run on this host (installed by `mesh deploy` as
# /usr/local/lib/mesh/mesh-ctl, run as root through sudo by the `mesh-ctl` account's forced command, which
# passes the controller's command line as ONE argument). Verbs (mesh/controller/protocol.py is the other side):
#
#   state                 identity NAME KIND / file NAME RELPATH SHA256 / cert NAME SERIAL NOT_BEFORE NOT_AFTER
#                         (or `cert NAME none`) / delivery NAME xds|files (what its Envoy started with, when
#                         its start step wrote HOME/admin/delivery) for every identity of
#                         /etc/mesh/ctl/identities, then `end`
#   apply                 stdin: a ustar archive of NAME/validate.yaml, NAME/xds/FILE.yaml, NAME/remove; per NAME
#                         the files are checked by Envoy's validate mode, then moved into HOME/xds one by one
#                         (waiting for a running Envoy to take each); prints `applied NAME`
#   csr NAME              a new key in HOME/tls.VERSION; prints `pending VERSION` and the CSR
#   install NAME VERSION  stdin: the certificate chain for that key; checked, then the `tls` link swapped to it;
#                         prints `installed NAME SERIAL`
#   restart NAME          a proxy's Envoy drained (POST /drain_listeners?graceful on its admin socket), then
#                         after DRAIN_WAIT_S its unit (vm) or sidecar (container) restarted; prints `restarted NAME`
#
# Anything else is refused (exit 2). Exit 1: a well-formed request that failed (Envoy refused the files, a
# certificate not for the pending key or not trusted). Only identities listed in the identities file are touched:
#   NAME KIND HOME OWNER CN TRUST IMAGE      (KIND vm|container|checker; IMAGE `-` unless container)
# MESH_CTL_ROOT (tests, benchmarks: sudo removes it from the environment) prefixes this script's own paths (the
# identities file, Envoy, systemctl and docker for `restart`, the lock and temp files in /run/mesh-ctl, the syslog
# socket); HOME and TRUST are used as the identities file writes them.
# shellcheck disable=SC2015,SC2174,SC2329 # `a && b || fail`: any step failing fails; /run is there; finish: a trap
set -f -u
umask 077
LC_ALL=C
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
IFS=' '
export LC_ALL PATH

ROOT=${MESH_CTL_ROOT:-}
IDENTITIES=$ROOT/etc/mesh/ctl/identities
ENVOY=$ROOT/usr/local/lib/mesh/envoy
SYSTEMCTL=$ROOT/usr/bin/systemctl
DOCKER=$ROOT/usr/bin/docker
RUN_DIR=$ROOT/run/mesh-ctl
LOCK=$RUN_DIR/lock
STAGING_NAME=.ctl-staging
MAX_REQUEST=512
MAX_BUNDLE=8388608
MAX_CHAIN=65536
MAX_MEMBERS=4096
WAIT_S=15
DRAIN_WAIT_S=5
VALIDATE_TIMEOUT_S=60
SIDECAR_MEMORY=256m

request=${1-}
work=''
staging=''

say() { printf 'mesh-ctl: %s\n' "$*" >&2; }
refuse() { say "refused: $*"; exit 2; }
fail() { say "$*"; exit 1; }
printable() { printf '%s' "$1" | tr -c 'A-Za-z0-9 ._:/=@+-' '?' | cut -c1-200; }

finish() {
  code=$?
  [ -n "$staging" ] && rm -rf -- "$staging"
  [ -n "$work" ] && rm -rf -- "$work"
  line="call: $(printable "$request") exit: $code"
  if [ -z "$ROOT" ]; then
    logger -t mesh-ctl -- "$line" > /dev/null 2>&1 || :
  else
    logger -u "$ROOT/dev/log" -t mesh-ctl -- "$line" > /dev/null 2>&1 || :
  fi
  exit "$code"
}
trap finish EXIT
trap 'exit 1' HUP INT TERM

# --- what a token may be (case patterns only: nothing here is ever evaluated) ---

is_name() {
  case $1 in '' | [!A-Za-z0-9]* | *[!A-Za-z0-9_.-]*) return 1 ;; esac
  [ "${#1}" -le 128 ]
}
is_version() {
  case $1 in
    [0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9][0-9][0-9][0-9][0-9][0-9]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]) return 0 ;;
  esac
  return 1
}
is_path() {
  case $1 in /*) ;; *) return 1 ;; esac
  case $1 in *[!A-Za-z0-9/._-]* | *..* | *//* | */) return 1 ;; esac
  return 0
}
is_owner() {
  case $1 in
    [a-z_]*) case $1 in *[!a-z0-9_-]*) return 1 ;; esac ;;
    [0-9]*) case $1 in *[!0-9]*) return 1 ;; esac ;;
    *) return 1 ;;
  esac
  [ "${#1}" -le 32 ]
}
is_cn() {
  case $1 in '' | [!A-Za-z0-9]* | *[!A-Za-z0-9._-]*) return 1 ;; esac
  [ "${#1}" -le 64 ]
}
is_image() {
  [ "$1" = - ] && return 0
  case $1 in '' | [!A-Za-z0-9]* | *[!A-Za-z0-9._/:@-]*) return 1 ;; esac
  return 0
}
is_xds_file() {
  case $1 in [a-z0-9]*.yaml) ;; *) return 1 ;; esac
  case $1 in *[!a-z0-9._-]*) return 1 ;; esac
  [ "${#1}" -le 200 ]
}

# --- the identities file (written by deploy, root 0644): every line checked on every call ---

identity_lines() {  # the file's identity lines, checked; refuses the call when one is malformed
  [ -f "$IDENTITIES" ] && [ ! -L "$IDENTITIES" ] || fail "no identities file $IDENTITIES (deploy writes it)"
  [ -z "$(find "$IDENTITIES" -perm /022 2>/dev/null)" ] || fail "$IDENTITIES is writable by others than root"
  n=0
  names=' '
  while read -r l_name l_kind l_home l_owner l_cn l_trust l_image l_extra || [ -n "${l_name-}" ]; do
    n=$((n + 1))
    case ${l_name-} in '' | '#'*) l_name=''; continue ;; esac
    is_name "$l_name" || refuse "$IDENTITIES line $n: bad name"
    case $l_kind in vm | container | checker) ;; *) refuse "$IDENTITIES line $n: bad kind" ;; esac
    is_path "$l_home" || refuse "$IDENTITIES line $n: bad home"
    is_owner "$l_owner" || refuse "$IDENTITIES line $n: bad owner"
    is_cn "$l_cn" || refuse "$IDENTITIES line $n: bad common name"
    is_path "$l_trust" || refuse "$IDENTITIES line $n: bad trust bundle"
    is_image "$l_image" || refuse "$IDENTITIES line $n: bad image"
    [ -z "$l_extra" ] || refuse "$IDENTITIES line $n: too many fields"
    if [ "$l_kind" = container ]; then
      [ "$l_image" != - ] || refuse "$IDENTITIES line $n: a container identity needs the sidecar image"
      case $l_owner in *[!0-9]*) refuse "$IDENTITIES line $n: a container identity needs a numeric owner" ;; esac
    elif [ "$l_image" != - ]; then
      refuse "$IDENTITIES line $n: an image for a $l_kind identity"
    fi
    case $names in *" $l_name "*) refuse "$IDENTITIES line $n: $l_name listed twice" ;; esac
    names="$names$l_name "
    printf '%s %s %s %s %s %s %s\n' "$l_name" "$l_kind" "$l_home" "$l_owner" "$l_cn" "$l_trust" "$l_image"
    l_name=''
  done < "$IDENTITIES"
}

lookup() {  # NAME: sets kind home owner cn trust image, or refuses an identity not in the file
  lines=$(identity_lines) || exit "$?"
  found=''
  while read -r i_name i_kind i_home i_owner i_cn i_trust i_image; do
    if [ "$i_name" = "$1" ]; then
      found=1 kind=$i_kind home=$i_home owner=$i_owner cn=$i_cn trust=$i_trust image=$i_image
    fi
  done <<EOF
$lines
EOF
  [ -n "$found" ] || refuse "unknown identity $1"
}

lock() {
  mkdir -p -m 0700 "$RUN_DIR" || fail "cannot create $RUN_DIR"
  exec 9>>"$LOCK" || fail "cannot open $LOCK"
  flock -w 120 9 || fail "another mesh-ctl call holds $LOCK"
}

new_work() {
  mkdir -p -m 0700 "$RUN_DIR" || fail "cannot create $RUN_DIR"
  work=$(mktemp -d "$RUN_DIR/call.XXXXXX") || fail "cannot create a folder in $RUN_DIR"
}

real_dir() { [ -d "$1" ] && [ ! -L "$1" ]; }

# --- state ---

sha_of() {  # FILE: its sha256, or nothing
  sum=$(sha256sum < "$1" 2>/dev/null) || return 1
  sum=${sum%% *}
  case $sum in *[!0-9a-f]*) return 1 ;; esac
  [ "${#sum}" -eq 64 ] && printf '%s' "$sum"
}

cert_line() {  # NAME HOME
  info=$(openssl x509 -noout -serial -startdate -enddate -in "$2/tls/cert.pem" 2>/dev/null) || {
    echo "cert $1 none"; return 0; }
  serial=$(printf '%s\n' "$info" | sed -n 's/^serial=0*\(.\)/\1/p' | tr 'A-F' 'a-f')
  start=$(date -u -d "$(printf '%s\n' "$info" | sed -n 's/^notBefore=//p')" +%s 2>/dev/null) || start=''
  end=$(date -u -d "$(printf '%s\n' "$info" | sed -n 's/^notAfter=//p')" +%s 2>/dev/null) || end=''
  case $serial in '' | *[!0-9a-f]*) echo "cert $1 none"; return 0 ;; esac
  case $start$end in *[!0-9-]*) echo "cert $1 none"; return 0 ;; esac
  if [ -z "$start" ] || [ -z "$end" ]; then echo "cert $1 none"; return 0; fi
  echo "cert $1 $serial $start $end"
}

do_state() {
  lines=$(identity_lines) || exit "$?"
  while read -r s_name s_kind s_home _rest; do
    [ -n "$s_name" ] || continue
    echo "identity $s_name $s_kind"
    if real_dir "$s_home/xds"; then
      found=$(find "$s_home/xds" -mindepth 1 -maxdepth 1 -type f -name '*.yaml' | sort)
      while IFS= read -r path; do
        file=${path##*/}
        is_xds_file "$file" || continue
        sum=$(sha_of "$path") && echo "file $s_name xds/$file $sum"
      done <<FILES
$found
FILES
    fi
    if [ -f "$s_home/envoy.yaml" ] && [ ! -L "$s_home/envoy.yaml" ]; then
      sum=$(sha_of "$s_home/envoy.yaml") && echo "file $s_name envoy.yaml $sum"
    fi
    cert_line "$s_name" "$s_home"
    marker=$s_home/admin/delivery  # written by the start step (Envoy's user's folder: a plain file, checked)
    if [ -f "$marker" ] && [ ! -L "$marker" ]; then
      delivery=$(head -c 16 "$marker" 2>/dev/null | head -n 1)
      case $delivery in xds | files) echo "delivery $s_name $delivery" ;; esac
    fi
  done <<EOF
$lines
EOF
  echo end
}

# --- apply ---

stats() { curl -sf --max-time 2 --unix-socket "$admin" "http://envoy/stats?filter=$1" 2>/dev/null; }
took() {  # FILTER LINE ABSENT_OK: the stat line is there (or no stat matches) and nothing warms
  found=$(stats "$1") || return 1
  if [ -n "$3" ] && [ -z "$found" ]; then :; elif ! printf '%s\n' "$found" | grep -qF -- "$2"; then return 1; fi
  stats warming | grep -qE ': [1-9]' && return 1
  return 0
}
wait_for() {  # FILTER LINE ABSENT_OK FILE
  [ "$live" = 1 ] || return 0
  i=0
  until took "$1" "$2" "$3"; do
    i=$((i + 1))
    [ "$i" -lt $((WAIT_S * 10)) ] || return 1
    sleep 0.1
  done
  return 0
}

version_of() {  # FILE: its version_info
  v=$(sed -n 's/^version_info: *//p' "$1" | head -n 1)
  v=${v#\'}; v=${v%\'}; v=${v#\"}; v=${v%\"}
  case $v in '' | *[!0-9a-zA-Z._-]*) return 1 ;; esac
  printf '%s' "$v"
}

envoy_validate() {  # CONFIG OUTPUT: this identity's Envoy checks CONFIG (as OWNER; a sidecar's image and mounts)
  if [ "$kind" = container ]; then
    admin_mount=''
    real_dir "$home/admin" && admin_mount="--volume $home/admin:$home/admin:rw"
    # shellcheck disable=SC2086 # admin_mount: words with no space of their own (is_path)
    timeout "$VALIDATE_TIMEOUT_S" docker run --rm --network none --read-only --cap-drop ALL \
      --security-opt no-new-privileges --user "$owner:$owner" --memory "$SIDECAR_MEMORY" \
      --volume "$home:$home:ro" $admin_mount "$image" \
      --mode validate -c "$1" --disable-hot-restart --log-level error > "$2" 2>&1
  else
    timeout "$VALIDATE_TIMEOUT_S" runuser -u "$owner" -- "$ENVOY" --mode validate -c "$1" \
      --disable-hot-restart --log-level error > "$2" 2>&1
  fi
}

apply_one() {  # NAME MEMBERS...: one identity's part of the bundle, extracted, checked, moved
  a_name=$1
  shift
  trap 'code=$?; [ -n "$staging" ] && rm -rf -- "$staging"; exit "$code"' EXIT
  lookup "$a_name"
  real_dir "$home" || fail "$a_name: no folder $home"
  if [ -e "$home/xds" ] && ! real_dir "$home/xds"; then fail "$a_name: $home/xds is not a folder"; fi
  staging=$home/$STAGING_NAME
  rm -rf -- "$staging" && mkdir -m 0750 "$staging" && chown "0:$owner" "$staging" \
    || fail "$a_name: cannot create $staging"
  tar -xmf "$work/bundle.tar" -C "$staging" --strip-components=1 --no-same-owner --no-same-permissions \
    --no-wildcards --no-overwrite-dir -- "$@" 2> "$work/tar.err" \
    || fail "$a_name: cannot extract the bundle: $(head -c 300 "$work/tar.err")"
  moves=''
  for member in "$@"; do
    rel=${member#*/}
    [ -f "$staging/$rel" ] && [ ! -L "$staging/$rel" ] || fail "$a_name: $rel was not extracted"
    chmod 0640 "$staging/$rel" && chown "0:$owner" "$staging/$rel" || fail "$a_name: cannot set the mode of $rel"
    case $rel in xds/*) moves="$moves ${rel#xds/}" ;; esac
  done
  if [ -d "$staging/xds" ]; then chmod 0750 "$staging/xds" && chown "0:$owner" "$staging/xds" || fail "$a_name: mode"; fi
  removes=''
  if [ -f "$staging/remove" ]; then
    while read -r line || [ -n "$line" ]; do
      case $line in xds/*) ;; *) refuse "$a_name: remove: not an xds file" ;; esac
      is_xds_file "${line#xds/}" || refuse "$a_name: remove: not an xds file"
      removes="$removes ${line#xds/}"
    done < "$staging/remove"
  fi
  if ! envoy_validate "$staging/validate.yaml" "$work/validate.out"; then
    say "$a_name: Envoy refused the files (nothing was moved):"
    if grep -q 'critical' "$work/validate.out"; then
      grep 'critical' "$work/validate.out" | head -n 20 | cut -c1-2000 >&2
    else
      tail -n 5 "$work/validate.out" | cut -c1-2000 >&2
    fi
    rm -rf -- "$staging"
    staging=''
    return 1
  fi
  if [ ! -d "$home/xds" ]; then
    mkdir -m 0750 "$home/xds" && chown "0:$owner" "$home/xds" || fail "$a_name: cannot create $home/xds"
  fi
  # Waits only for an Envoy that answers on its admin socket and runs this folder's bootstrap.
  admin=$home/admin/admin.sock
  live=0
  boot=$(sed -n 's/^ *mesh_bootstrap_sha256: *//p' "$home/envoy.yaml" 2>/dev/null | head -n 1 | tr -d "\"'")
  case $boot in
    '' | *[!0-9a-f]*) ;;
    *) curl -sf --max-time 2 --unix-socket "$admin" http://envoy/server_info 2>/dev/null | grep -qF -- "$boot" \
         && live=1 ;;
  esac
  # An Envoy started from envoy-ads.yaml (the start step's marker says xds) reads no resource file: the files are
  # its last-known-good config, and there is nothing to wait for.
  [ "$(head -c 16 "$home/admin/delivery" 2>/dev/null)" = xds ] && live=0
  for file in $moves; do
    wait_stat=''
    case $file in
      cds.yaml) wait_stat=cluster_manager.cds.version_text; line_prefix='' ;;
      lds.yaml) wait_stat=listener_manager.lds.version_text; line_prefix='' ;;
      rds.*.yaml) route=${file#rds.}; wait_stat=rds.${route%.yaml}.version_text; line_prefix=. ;;
    esac
    version=''
    if [ -n "$wait_stat" ]; then
      version=$(version_of "$staging/xds/$file") || fail "$a_name: xds/$file has no version_info"
    fi
    mv -fT -- "$staging/xds/$file" "$home/xds/$file" || fail "$a_name: cannot move xds/$file into place"
    if [ -n "$wait_stat" ]; then
      wait_for "$wait_stat" "$line_prefix$wait_stat: \"$version\"" absent-ok \
        || fail "$a_name: Envoy did not take xds/$file within $WAIT_S s (it runs the files it took before; see its log)"
    fi
  done
  for file in $removes; do
    rm -f -- "$home/xds/$file"
  done
  rm -rf -- "$staging"
  staging=''
  echo "applied $a_name"
}

do_apply() {
  new_work  # the bundle is read and listed before the lock: a slow sender never holds up another call
  head -c $((MAX_BUNDLE + 1)) > "$work/bundle.tar" || fail "cannot read the bundle"
  size=$(wc -c < "$work/bundle.tar")
  [ "$size" -le "$MAX_BUNDLE" ] || refuse "bundle larger than $MAX_BUNDLE bytes"
  [ "$size" -gt 0 ] || refuse "empty bundle"
  # List first (names as stored: -P keeps a leading /), extract only what every check let through.
  tar -tPf "$work/bundle.tar" > "$work/names" 2>/dev/null || refuse "the bundle is not a tar archive"
  tar -tvPf "$work/bundle.tar" > "$work/long" 2>/dev/null || refuse "the bundle is not a tar archive"
  [ -s "$work/names" ] || refuse "empty bundle"
  [ "$(wc -l < "$work/names")" -le "$MAX_MEMBERS" ] || refuse "more than $MAX_MEMBERS members in the bundle"
  [ "$(wc -l < "$work/names")" -eq "$(wc -l < "$work/long")" ] || refuse "bundle members with odd names"
  grep -qv '^-' "$work/long" && refuse "bundle members must be regular files"
  [ -z "$(sort "$work/names" | uniq -d)" ] || refuse "a bundle member twice"
  order=' '
  while IFS= read -r member; do
    m_name=${member%%/*}
    is_name "$m_name" || refuse "bundle member with a bad name"
    rel=${member#*/}
    case $rel in
      validate.yaml | remove) ;;
      xds/*) is_xds_file "${rel#xds/}" || refuse "bundle member with a bad name" ;;
      *) refuse "bundle member with a bad name" ;;
    esac
    case $order in *" $m_name "*) ;; *) order="$order$m_name " ;; esac
  done < "$work/names"
  lock
  for a_name in $order; do  # every identity known and one with resource files, before anything is written
    lookup "$a_name"
    [ "$kind" != checker ] || refuse "$a_name has no resource files"
    grep -qxF -- "$a_name/validate.yaml" "$work/names" || refuse "no $a_name/validate.yaml in the bundle"
  done
  failed=0
  for a_name in $order; do
    members=''
    while IFS= read -r member; do
      case $member in "$a_name"/*) members="$members $member" ;; esac
    done < "$work/names"
    # a subshell per identity: a failure refuses that identity's files only (the worst exit code is the call's)
    # shellcheck disable=SC2086 # members: checked names, no space in them
    (apply_one "$a_name" $members) || { code=$?; [ "$code" -le "$failed" ] || failed=$code; }
  done
  exit "$failed"
}

# --- csr and install ---

do_csr() {
  lock
  lookup "$1"
  real_dir "$home" || fail "$1: no folder $home"
  version=$(date -u +%Y%m%dT%H%M%S)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
  is_version "$version" || fail "$1: cannot make a key version"
  dir=$home/tls.$version
  mkdir -m 0750 "$dir" && chown "0:$owner" "$dir" || fail "$1: cannot create $dir"
  key=$dir/key.pem
  tmp_key=$key.mesh-tmp
  if ! { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp_key" 2>/dev/null \
         && chown "$owner:$owner" "$tmp_key" && chmod 0600 "$tmp_key" && mv -f "$tmp_key" "$key"; }; then
    rm -rf -- "$dir"
    fail "$1: cannot create a key"
  fi
  if ! csr=$(openssl req -new -sha256 -key "$key" -subj "/CN=$cn" 2>/dev/null); then
    rm -rf -- "$dir"
    fail "$1: cannot make a CSR"
  fi
  echo "pending $version"
  printf '%s\n' "$csr"
}

do_install() {
  lookup "$1"
  new_work  # the chain is read before the lock: a slow sender never holds up another call
  head -c $((MAX_CHAIN + 1)) > "$work/chain.pem" || fail "cannot read the certificate chain"
  lock
  dir=$home/tls.$2
  real_dir "$dir" && [ -f "$dir/key.pem" ] && [ ! -L "$dir/key.pem" ] || refuse "$1: no pending key $2"
  [ "$(readlink "$home/tls" 2>/dev/null)" != "tls.$2" ] || refuse "$1: $2 is installed already"
  [ "$(wc -c < "$work/chain.pem")" -le "$MAX_CHAIN" ] || refuse "certificate chain larger than $MAX_CHAIN bytes"
  grep -qvE '^(-----BEGIN CERTIFICATE-----|-----END CERTIFICATE-----|[A-Za-z0-9+/=]{1,76}|)$' "$work/chain.pem" \
    && refuse "$1: stdin is not a PEM certificate chain"
  grep -q '^-----BEGIN CERTIFICATE-----$' "$work/chain.pem" || refuse "$1: no certificate on stdin"
  openssl x509 -in "$work/chain.pem" -out "$work/leaf.pem" 2>/dev/null || fail "$1: unreadable certificate"
  leaf_key=$(openssl x509 -noout -pubkey -in "$work/leaf.pem" 2>/dev/null) || fail "$1: unreadable certificate"
  pending_key=$(openssl pkey -in "$dir/key.pem" -pubout 2>/dev/null) || fail "$1: unreadable key $dir/key.pem"
  [ "$leaf_key" = "$pending_key" ] || fail "$1: the certificate is not for the pending key $2"
  [ -f "$trust" ] || fail "$1: no trust bundle $trust"
  if ! openssl verify -no-CApath -no-CAstore -CAfile "$trust" -untrusted "$work/chain.pem" "$work/leaf.pem" > "$work/verify" 2>&1; then
    fail "$1: the certificate is not trusted by $trust: $(grep -i error "$work/verify" | head -n 2 | tr '\n' ' ' | cut -c1-300)"
  fi
  serial=$(openssl x509 -noout -serial -in "$work/leaf.pem" | sed -n 's/^serial=0*\(.\)/\1/p' | tr 'A-F' 'a-f')
  case $serial in '' | *[!0-9a-f]*) fail "$1: unreadable serial" ;; esac
  cp "$work/chain.pem" "$dir/.cert.pem.new" && chown 0:0 "$dir/.cert.pem.new" && chmod 0644 "$dir/.cert.pem.new" \
    && mv -f "$dir/.cert.pem.new" "$dir/cert.pem" || fail "$1: cannot write $dir/cert.pem"
  # One rename swaps key and certificate together; then the folders of older (or abandoned) keys go.
  ln -sfn "tls.$2" "$home/.tls.new" && mv -fT "$home/.tls.new" "$home/tls" || fail "$1: cannot swap $home/tls"
  find "$home" -mindepth 1 -maxdepth 1 -name 'tls.*' ! -name "tls.$2" -exec rm -rf -- {} + 2>/dev/null
  rm -f -- "$home/key.pem" "$home/cert.pem"
  echo "installed $1 $serial"
}

# --- restart ---

do_restart() {
  lookup "$1"
  case $kind in vm | container) ;; *) refuse "$1 is not a proxy" ;; esac
  new_work
  lock
  # Envoy finishes what it serves and tells clients to go elsewhere; one that does not answer is restarted as well.
  curl -sf --max-time 5 --unix-socket "$home/admin/admin.sock" -X POST 'http://envoy/drain_listeners?graceful' \
    > /dev/null 2>&1 || say "$1: Envoy did not take the drain (restarting it anyway)"
  sleep "$DRAIN_WAIT_S"
  if [ "$kind" = vm ]; then
    "$SYSTEMCTL" restart "mesh-envoy-$1.service" > "$work/restart.out" 2>&1
  else
    "$DOCKER" restart --time 5 "mesh-envoy-$1" > "$work/restart.out" 2>&1
  fi || fail "$1: the restart failed: $(head -c 300 "$work/restart.out" | tr '\n' ' ')"
  echo "restarted $1"
}

# --- the request ---

[ "$#" -eq 1 ] || refuse "expected the command as one argument"
[ "${#request}" -le "$MAX_REQUEST" ] || refuse "command too long"
case $ROOT in
  '') ;;
  *) is_path "$ROOT" || refuse "MESH_CTL_ROOT is not a plain absolute path" ;;
esac
# shellcheck disable=SC2086 # split on spaces, never globbed (set -f); every word is checked below
set -- $1
[ "$#" -ge 1 ] || refuse "no command"
verb=$1
shift
case $verb in
  state) [ "$#" -eq 0 ] || refuse "state takes no argument"; do_state ;;
  apply) [ "$#" -eq 0 ] || refuse "apply takes no argument"; do_apply ;;
  csr) [ "$#" -eq 1 ] && is_name "$1" || refuse "usage: csr NAME"; do_csr "$1" ;;
  install) [ "$#" -eq 2 ] && is_name "$1" && is_version "$2" || refuse "usage: install NAME VERSION"; do_install "$1" "$2" ;;
  restart) [ "$#" -eq 1 ] && is_name "$1" || refuse "usage: restart NAME"; do_restart "$1" ;;
  *) refuse "unknown verb $(printable "$verb")" ;;
esac
exit 0
