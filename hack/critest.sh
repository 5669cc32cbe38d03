#!/usr/bin/env bash
# Runs cri-tools' critest, the Kubernetes CRI validation suite, once with runc and once with shoji on a private
# containerd, and compares them: a spec runc passes that shoji fails or skips is a regression, unless
# hack/critest-vm-inherent.txt lists it as impossible in a VM. Prints a table and the differing specs; leaves
# containerd's, the registry's and critest's logs in a directory it names. As root. See docs/conformance.md.
#
#   hack/critest.sh --cri-tools PATH/cri-tools-v1.32.0.tar.gz [--containerd 2|1.7] [--runtimes "runc shoji"]
#                   [--focus REGEX]
#
# The tarball (cri-tools' source with its vendored modules) is needed once: critest and crictl are built with
# Go 1.23 (Debian bookworm-backports) and cached in ${SHOJI_CACHE:-/var/cache/shoji}/critest/<tarball sha>/.
# Everything the run starts (containerd, the image registry, shims, VMs, network, mounts) is its own and is
# removed on exit, Ctrl-C and timeout included. Each critest run is bounded by CRITEST_TIMEOUT seconds (default
# 1200) and each CRI call by CRITEST_CALL_TIMEOUT (default 60 s), so a hung call fails its spec.
set -Eeuo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
CACHE=${SHOJI_CACHE:-/var/cache/shoji}
ALLOW_LIST=$root/hack/critest-vm-inherent.txt
# The handler and specs of the recursive read-only run (containerd 2.x only; see runtimes_toml).
RRO_HANDLER=shoji-rro
RRO_FOCUS="recursive readonly mount"
RUN_TIMEOUT=${CRITEST_TIMEOUT:-1200}
CALL_TIMEOUT=${CRITEST_CALL_TIMEOUT:-60}
# Serialises private containerds on this host with the test harness (tests/src/containerd.rs): containerd 1.7
# keeps shim sockets under /run/containerd whatever its config says.
LOCK=/run/shoji-tests/containerd.lock
SANDBOX_IMAGE=registry.k8s.io/pause:3.10
BRIDGE=shojicrit0
SUBNET=10.251.1.0/24
log() { echo "[critest] $*" >&2; }
die() { log "$*"; exit 1; }

tarball='' ctrd_version=2 runtimes='runc shoji' focus=''
while [ $# -gt 0 ]; do
  case "$1" in
    --cri-tools) tarball=$2; shift 2 ;;
    --containerd) ctrd_version=$2; shift 2 ;;
    --runtimes) runtimes=$2; shift 2 ;;
    --focus) focus=$2; shift 2 ;;
    *) sed -n '2,/^set -e/p' "$0" | sed '$d' >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root"
case "$ctrd_version" in 2|1.7) ;; *) die "--containerd: 2 or 1.7" ;; esac
for rt in $runtimes; do
  case "$rt" in runc|shoji) ;; *) die "--runtimes: runc and/or shoji, not $rt" ;; esac
done

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 "$@" >&2
}

# Go 1.23 from bookworm-backports, the suite added only when the package is not installed yet.
ensure_go() {
  [ -x /usr/lib/go-1.23/bin/go ] && return
  if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding bookworm-backports to apt's sources (for golang-1.23-go)"
    echo 'deb http://deb.debian.org/debian bookworm-backports main' >/etc/apt/sources.list.d/bookworm-backports.list
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -q -o DPkg::Lock::Timeout=600 >&2
  apt_install -t bookworm-backports golang-1.23-go
}

# critest and crictl for the tarball, built once per tarball content; `current` names the last one.
critest_binaries() {
  local store=$CACHE/critest
  if [ -z "$tarball" ]; then
    [ -x "$store/current/critest" ] || die "no critest in $store: pass --cri-tools PATH/cri-tools-v1.32.0.tar.gz"
    BIN=$store/current
    return
  fi
  [ -f "$tarball" ] || die "--cri-tools $tarball: no such file"
  local sha
  sha=$(sha256sum "$tarball" | cut -c1-16)
  BIN=$store/$sha
  if [ ! -x "$BIN/critest" ] || [ ! -x "$BIN/crictl" ]; then
    ensure_go
    log "building critest and crictl from $(basename "$tarball") (about 3 minutes)"
    local src
    src=$(mktemp -d /tmp/shoji-critest-src.XXXXXX)
    rm -rf "$BIN.partial" && mkdir -p "$BIN.partial"
    tar -xzf "$tarball" -C "$src" --strip-components=1
    (cd "$src" && export PATH=/usr/lib/go-1.23/bin:$PATH GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local \
        CGO_ENABLED=0 GOCACHE=$store/go-build &&
      go test -c -o "$BIN.partial/critest" ./cmd/critest && go build -o "$BIN.partial/crictl" ./cmd/crictl) >&2 ||
      { rm -rf "$src"; die "building critest failed"; }
    rm -rf "$src"
    mv "$BIN.partial" "$BIN"
  fi
  ln -sfn "$sha" "$store/current"
}

# Debian's dynamically linked busybox, for the images' /bin/sh: its shell runs commands by exec through PATH as
# the e2e busybox image's does (busybox-static's runs its own applets in-process, so a masked /bin/ls would
# still run). Fetched once with apt-get download, never installed (it conflicts with busybox-static). Without
# it the images keep busybox-static's shell and only the MaskedPaths spec suffers.
shell_busybox() {
  local dest=$CACHE/critest/busybox-shell tmp
  SHELL_ARGS=(--shell "$dest/bin/busybox")
  [ -x "$dest/bin/busybox" ] && return
  tmp=$(mktemp -d /tmp/shoji-critest-busybox.XXXXXX)
  if (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root busybox) >&2 &&
    rm -rf "$dest.partial" && dpkg-deb -x "$tmp"/busybox_*.deb "$dest.partial"; then
    mv "$dest.partial" "$dest"
  else
    log "could not fetch Debian's busybox package: the images keep busybox-static's shell (MaskedPaths fails)"
    SHELL_ARGS=()
  fi
  rm -rf "$tmp"
}

command -v jq >/dev/null || apt_install jq
critest_binaries
shell_busybox
# shoji's pieces (guest kernel, initramfs, shim), only when shoji runs.
if [[ " $runtimes " == *" shoji "* ]]; then
  hack/setup.sh >&2 || die "hack/setup.sh failed"
fi
cargo build -q -p shoji-tests --bin critest-registry >&2
target=${CARGO_TARGET_DIR:-$root/target}/debug
CTRD_BIN=$CACHE/containerd/$ctrd_version/usr/bin
[ -x "$CTRD_BIN/containerd" ] || die "no containerd in $CTRD_BIN (hack/install-containerd.sh)"

# ---- the run's own resources, all removed by cleanup() ----
# Short: shoji's sandbox sockets live under $RUN_DIR/<64-hex id>/ and Unix socket paths are limited to 108 bytes.
WORK=$(mktemp -d /tmp/shjcrt.XXXXXX)
LOGS=$(mktemp -d /tmp/shoji-critest-logs.XXXXXX)
SOCK=$WORK/ctrd.sock
RUN_DIR=$WORK/run
CTRD_PID='' REGISTRY_PID='' CRITEST_PID=''
shm_before=$(ipcs -m | awk '$2 ~ /^[0-9]+$/ {print $2}' | sort)

# Pids of processes whose NUL-separated /proc/<pid>/$1 has an entry equal to $2.
pids_with() {
  local f
  for f in /proc/[0-9]*/"$1"; do
    if tr '\0' '\n' 2>/dev/null <"$f" | grep -qxF -- "$2"; then
      f=${f#/proc/}
      echo "${f%%/*}"
    fi
  done
}

stop_pid() { # pid, seconds of grace after SIGTERM
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 0
  kill "$1" 2>/dev/null || true
  timeout "$2" tail --pid="$1" -f /dev/null 2>/dev/null || kill -9 "$1" 2>/dev/null || true
}

# portmap's DNAT rules of our network's pods that never got their CNI DEL (a stop that hung): the jumps from
# CNI-HOSTPORT-DNAT, which name the network, and the per-pod chains they lead to.
drop_portmap_rules() {
  # The chain exists only once portmap has run on this host (not on a fresh machine).
  { iptables -t nat -L CNI-HOSTPORT-DNAT -n --line-numbers 2>/dev/null || true; } |
    awk '/dnat name: "shoji-critest"/ {print $1, $2}' | sort -rn | while read -r num chain; do
    iptables -t nat -D CNI-HOSTPORT-DNAT "$num" && iptables -t nat -F "$chain" && iptables -t nat -X "$chain"
  done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  stop_pid "$CRITEST_PID" 30
  if [ -n "$CTRD_PID" ] && kill -0 "$CTRD_PID" 2>/dev/null; then
    # Pods removed through CRI, so that CNI takes their veths, addresses and hostPort rules back.
    timeout 180 "$BIN/crictl" --runtime-endpoint "unix://$SOCK" --timeout 60s rmp -fa >>"$LOGS/cleanup.log" 2>&1 ||
      log "crictl rmp -fa did not finish (see $LOGS/cleanup.log)"
  fi
  stop_pid "$CTRD_PID" 10
  # Shims (their command line names our socket) and VMMs (their environment names our shoji run dir).
  for pid in $( (pids_with cmdline "$SOCK"; pids_with environ "SHOJI_RUN_DIR=$RUN_DIR") | sort -u); do
    echo "killed leftover pid $pid: $(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null)" >>"$LOGS/cleanup.log"
    kill -9 "$pid" 2>/dev/null
  done
  stop_pid "$REGISTRY_PID" 5
  awk -v w="$WORK/" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>>"$LOGS/cleanup.log"
  done
  ip link del "$BRIDGE" 2>/dev/null
  drop_portmap_rules
  # critest's HostIpc specs make 1 MiB segments on the host with ipcmk and never remove them.
  for id in $(comm -13 <(echo "$shm_before") <(ipcs -m | awk '$2 ~ /^[0-9]+$/ && $5 == 1048576 && $6 == 0 {print $2}' | sort)); do
    ipcrm -m "$id"
  done
  rm -rf "$WORK"
  log "logs: $LOGS"
  exit "$rc"
}
trap cleanup EXIT
# A command that fails outside an `if` ends the run: say which.
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$(dirname "$LOCK")"
exec 9>>"$LOCK"
log "waiting for the host-wide containerd lock $LOCK"
flock -w 900 9 || die "another private containerd held $LOCK for 15 minutes"

# The image registry (tests/src/bin/critest-registry.rs) on a free port of 127.0.0.1.
"$target/critest-registry" --port-file "$WORK/registry.addr" "${SHELL_ARGS[@]}" >/dev/null 2>"$LOGS/registry.log" 9>&- &
REGISTRY_PID=$!
for _ in $(seq 600); do
  [ -s "$WORK/registry.addr" ] || ! kill -0 "$REGISTRY_PID" 2>/dev/null && break
  sleep 0.2
done
[ -s "$WORK/registry.addr" ] || die "the image registry did not start (see $LOGS/registry.log)"
REGISTRY=$(cat "$WORK/registry.addr")
log "image registry on $REGISTRY"

# containerd resolves the images' registries to it, and falls back to nothing else.
for host in registry.k8s.io gcr.io; do
  mkdir -p "$WORK/certs.d/$host"
  printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' \
    "$REGISTRY" "$REGISTRY" >"$WORK/certs.d/$host/hosts.toml"
done

# A bridge with host-local addresses and portmap (the hostPort specs), no masquerade: traffic stays on the host.
mkdir -p "$WORK/net.d"
cat >"$WORK/net.d/10-critest.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "shoji-critest", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$SUBNET"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$WORK/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
ip link del "$BRIDGE" 2>/dev/null || true
drop_portmap_rules

runtimes_toml() { # the CRI runtimes table prefix
  printf '[%s.runtimes.runc]\n  runtime_type = "io.containerd.runc.v2"\n' "$1"
  printf '[%s.runtimes.shoji]\n  runtime_type = "io.containerd.shoji.v2"\n' "$1"
  # containerd 2.x asks only runtimes of type io.containerd.runc.v2 for their OCI features (and so offers recursive
  # read-only mounts only to them): shoji's shim under that type, its binary named, runs the RRO specs.
  [ "$ctrd_version" = 2 ] && printf '[%s.runtimes.%s]\n  runtime_type = "io.containerd.runc.v2"\n  runtime_path = "%s"\n' \
    "$1" "$RRO_HANDLER" "$target/containerd-shim-shoji-v2"
  return 0
}
common_toml() {
  printf 'root = "%s"\nstate = "%s"\n[grpc]\n  address = "%s"\n[ttrpc]\n  address = "%s"\n' \
    "$WORK/root" "$WORK/state" "$SOCK" "$WORK/ctrd.ttrpc"
}
if [ "$ctrd_version" = 2 ]; then
  rt="plugins.'io.containerd.cri.v1.runtime'"
  {
    echo 'version = 3'
    common_toml
    cat <<EOF
[plugins.'io.containerd.internal.v1.opt']
  path = "$WORK/opt"
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "$SANDBOX_IMAGE"
[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = "$WORK/certs.d"
[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[$rt]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  enable_cdi = false
[$rt.cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "$WORK/net.d"
[$rt.containerd]
  default_runtime_name = "runc"
EOF
    runtimes_toml "$rt.containerd"
  } >"$WORK/config.toml"
else
  cri='plugins."io.containerd.grpc.v1.cri"'
  {
    echo 'version = 2'
    common_toml
    cat <<EOF
[plugins."io.containerd.internal.v1.opt"]
  path = "$WORK/opt"
[plugins."io.containerd.nri.v1.nri"]
  disable = true
[$cri]
  sandbox_image = "$SANDBOX_IMAGE"
  restrict_oom_score_adj = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false
[$cri.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$WORK/net.d"
[$cri.registry]
  config_path = "$WORK/certs.d"
[$cri.containerd]
  default_runtime_name = "runc"
  snapshotter = "overlayfs"
EOF
    runtimes_toml "$cri.containerd"
  } >"$WORK/config.toml"
fi
cp "$WORK/config.toml" "$LOGS/containerd-config.toml"

# shoji's own configuration, not the host's /etc/shoji: torn-down sandboxes' logs (guest console, agent) go to
# the logs directory.
mkdir -p "$RUN_DIR" "$LOGS/shoji"
printf 'log_dir = "%s"\nlog_retention = 1000\n' "$LOGS/shoji" >"$WORK/shoji.toml"
PATH="$CTRD_BIN:$target:$PATH" SHOJI_CACHE=$CACHE SHOJI_RUN_DIR=$RUN_DIR SHOJI_CONFIG=$WORK/shoji.toml \
  # 9>&-: the lock is this script's; a shim or VM that outlived a hung stop must not hold it.
  "$CTRD_BIN/containerd" --config "$WORK/config.toml" --log-level debug >"$LOGS/containerd.log" 2>&1 9>&- &
CTRD_PID=$!
for _ in $(seq 300); do
  [ -S "$SOCK" ] && "$CTRD_BIN/ctr" --address "$SOCK" version >/dev/null 2>&1 && break
  kill -0 "$CTRD_PID" 2>/dev/null || die "containerd exited (see $LOGS/containerd.log)"
  sleep 0.1
done
"$CTRD_BIN/ctr" --address "$SOCK" version >/dev/null 2>&1 || die "containerd not ready in 30 s"
crictl() { timeout 300 "$BIN/crictl" --runtime-endpoint "unix://$SOCK" --image-endpoint "unix://$SOCK" "$@"; }
crictl pull "$SANDBOX_IMAGE" >/dev/null 2>>"$LOGS/crictl.log" || die "pulling $SANDBOX_IMAGE from the registry failed"
log "containerd $("$CTRD_BIN/containerd" --version | awk '{print $3}') on $SOCK"

# One critest run per runtime, bounded; its ginkgo JSON report is what gets compared.
declare -A seconds
run_critest() { # handler, focus regex (or empty)
  local rt=$1
  log "critest with runtime handler $rt (at most $RUN_TIMEOUT s; log $LOGS/critest-$rt.log)"
  args=(--runtime-endpoint "unix://$SOCK" --image-endpoint "unix://$SOCK" --runtime-handler "$rt"
    --runtime-service-timeout "${CALL_TIMEOUT}s" --ginkgo.skip Windows --ginkgo.no-color --ginkgo.v
    --ginkgo.timeout "$((RUN_TIMEOUT - 60))s" --ginkgo.json-report "$LOGS/critest-$rt.json")
  [ -n "$2" ] && args+=(--ginkgo.focus "$2")
  start=$(date +%s)
  # In a directory of its own, removed with the rest: anything critest writes relative to where it runs.
  mkdir -p "$WORK/critest-$rt"
  (cd "$WORK/critest-$rt" && exec timeout -k 30 "$RUN_TIMEOUT" "$BIN/critest" "${args[@]}") >"$LOGS/critest-$rt.log" 2>&1 9>&- &
  CRITEST_PID=$!
  wait "$CRITEST_PID" || log "critest ($rt) exited with status $? (failures are counted from its report)"
  CRITEST_PID=''
  seconds[$rt]=$(($(date +%s) - start))
  # Pods a hung spec left behind must not weigh on the next runtime's run.
  crictl --timeout 60s rmp -fa >>"$LOGS/crictl.log" 2>&1 || true
}
for rt in $runtimes; do run_critest "$rt" "$focus"; done
rro_run=''
if [[ " $runtimes " == *" shoji "* && "$ctrd_version" = 2 ]]; then
  rro_run=1
  run_critest "$RRO_HANDLER" "$RRO_FOCUS"
fi

# ---- results ----
# One line per spec: name <TAB> state <TAB> first line of the failure or skip message.
specs() {
  [ -s "$LOGS/critest-$1.json" ] || return 0
  # The gist of a failure: gomega's lines before its dump of the error value ("{" ... "occurred"), without its
  # type annotations; container and pod ids shortened.
  jq -r 'def brief: split("\n") | map(sub("^\\s+"; "") | sub("\\s+$"; ""))
      | .[0:((map(. == "{" or . == "occurred") | index(true)) // length)]
      | map(select(. != "" and . != "Unexpected error:" and (test("^<[^>]*>:$") | not)))
      | join(" ") | gsub("failed to create containerd task: failed to create shim task: create [0-9a-f]{64}: "; "")
      | gsub("(?<id>[0-9a-f]{12})[0-9a-f]{52}"; "\(.id)...");
    .[].SpecReports[]? | select(.LeafNodeType == "It")
    | [((.ContainerHierarchyTexts // []) + [.LeafNodeText] | join(" ")),
       (if .State == "passed" then "passed" elif .State == "skipped" or .State == "pending" then "skipped"
        else "failed" end),
       ((if (.Failure.FailureNodeType // "It") != "It" then "in \(.Failure.FailureNodeType): " else "" end)
        + (.Failure.Message // "" | brief) | .[0:300])]
    | @tsv' "$LOGS/critest-$1.json" | sort
}
declare -A state message
for rt in $runtimes; do
  while IFS=$'\t' read -r name st msg; do
    state[$rt/$name]=$st
    message[$rt/$name]=$msg
  done < <(specs "$rt")
done
allowed() { grep -v '^\s*#' "$ALLOW_LIST" | sed 's/\s*#.*//' | grep -qxF -- "$1"; }

summary=$LOGS/summary.txt
status=0
{
  echo "== critest $(basename "$(readlink -f "$BIN")") on containerd $("$CTRD_BIN/containerd" --version | awk '{print $3}')"
  printf '%-8s %7s %7s %8s %7s\n' runtime passed failed skipped seconds
  for rt in $runtimes; do
    if [ ! -s "$LOGS/critest-$rt.json" ]; then
      printf '%-8s no report (see %s)\n' "$rt" "$LOGS/critest-$rt.log"
      status=1
      continue
    fi
    declare -A count=([passed]=0 [failed]=0 [skipped]=0)
    while IFS=$'\t' read -r _ st _; do count[$st]=$((count[$st] + 1)); done < <(specs "$rt")
    printf '%-8s %7d %7d %8d %7d\n' "$rt" "${count[passed]}" "${count[failed]}" "${count[skipped]}" "${seconds[$rt]}"
  done
  if [[ " $runtimes " == *" runc "* && " $runtimes " == *" shoji "* ]]; then
    regressions=() inherent=() better=()
    while IFS=$'\t' read -r name st _; do
      shoji=${state[shoji/$name]:-missing}
      if [ "$st" = passed ] && [ "$shoji" != passed ]; then
        line="$(printf '%-7s' "${shoji^^}") $name: ${message[shoji/$name]:-}"
        if allowed "$name"; then inherent+=("$line"); else regressions+=("$line"); fi
      elif [ "$st" != passed ] && [ "$shoji" = passed ]; then
        better+=("$name")
      fi
    done < <(specs runc)
    echo "== specs runc passes and shoji does not: ${#regressions[@]}"
    for l in "${regressions[@]}"; do echo "  $l"; done
    echo "== of those, allowed as VM-inherent (hack/critest-vm-inherent.txt): ${#inherent[@]}"
    for l in "${inherent[@]}"; do echo "  $l"; done
    if [ ${#better[@]} -gt 0 ]; then
      echo "== specs shoji passes and runc does not: ${#better[@]}"
      for l in "${better[@]}"; do echo "  $l"; done
    fi
    [ ${#regressions[@]} -eq 0 ] || status=1
  fi
  if [ -n "$rro_run" ]; then
    # Every recursive read-only spec runs (not skipped: containerd learned the feature) and passes.
    rro_bad=()
    rro_passed=0
    while IFS=$'\t' read -r name st msg; do
      # The report lists every spec; those outside the focus are skipped by it.
      [[ "$name" =~ $RRO_FOCUS ]] || continue
      if [ "$st" = passed ]; then rro_passed=$((rro_passed + 1)); else rro_bad+=("$(printf '%-7s' "${st^^}") $name: $msg"); fi
    done < <(specs "$RRO_HANDLER")
    echo "== recursive read-only specs, shoji as runtime_type io.containerd.runc.v2 ($RRO_HANDLER): $rro_passed passed, ${#rro_bad[@]} not"
    for l in "${rro_bad[@]}"; do echo "  $l"; done
    [ ${#rro_bad[@]} -eq 0 ] && [ "$rro_passed" -gt 0 ] || status=1
  fi
  if [[ ! (" $runtimes " == *" runc "* && " $runtimes " == *" shoji "*) ]]; then
    # One runtime alone: its failures are the result.
    for rt in $runtimes; do
      for key in "${!state[@]}"; do
        [ "${key%%/*}" = "$rt" ] && [ "${state[$key]}" = failed ] && status=1
      done
    done
  fi
  if [ "$status" = 0 ]; then echo "== critest: PASS"; else echo "== critest: FAIL"; fi
} >"$summary"
cat "$summary"
[ "$status" = 0 ]
