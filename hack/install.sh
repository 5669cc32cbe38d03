#!/usr/bin/env bash
# Installs shoji on a node (or into a scratch root), and removes it again.
#
#   hack/install.sh [--root DIR] [--bin-dir DIR] [--containerd-version 1.7|2]
#   hack/install.sh --uninstall [--root DIR]
#
# Installs, under DIR (default /):
#   usr/local/bin/{containerd-shim-shoji-v2,shoji}     from --bin-dir (default target/release,
#                                                      else target/debug)
#   usr/share/shoji/{vmlinux,initramfs.img}            from ${SHOJI_CACHE:-/var/cache/shoji}
#   etc/shoji/{qemu,clh}.toml                          one file per handler (docs/operating.md §3)
#   etc/containerd/conf.d/shoji.toml                   handlers shoji (CH) and shoji-qemu, in the
#                                                      layout of the containerd version (1.6/1.7:
#                                                      version = 2; 2.x: version = 3)
#   usr/share/shoji/runtimeclass.yaml                  RuntimeClasses with overhead (§5)
#   etc/containerd/config.toml                         only when there is none: containerd's
#                                                      defaults plus `imports` of conf.d
# Paths written into the files point into DIR, so a scratch root is self-contained.
# Idempotent: a second run changes nothing. What it made is listed, with checksums, in
# usr/share/shoji/install-manifest; --uninstall removes exactly that (a file changed since
# is kept and named) and the directories it created. Needs root for / only.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=/
bin_dir=
ctrd_version=auto
uninstall=0
log() { echo "[install] $*" >&2; }
die() { log "error: $*"; exit 1; }
# The marked handler block in containerd 1.x's config.toml (see below).
begin='# BEGIN shoji handlers (hack/install.sh)'
end='# END shoji handlers'
without_block() { awk -v b="$begin" -v e="$end" '$0 == b { skip = 1 } !skip { print } $0 == e { skip = 0 }'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --containerd-version) ctrd_version=${2:?--containerd-version needs 1.7 or 2}; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
mkdir -p "$root"
root=$(cd "$root" && pwd)
prefix=${root%/}                     # "" for /
share=$prefix/usr/share/shoji
manifest=$share/install-manifest

# ---- uninstall ---------------------------------------------------------------------------
if [ "$uninstall" = 1 ]; then
  [ -f "$manifest" ] || { log "nothing installed under $root (no $manifest)"; exit 0; }
  kept=0
  while read -r kind sum path; do
    [ "$kind" = f ] || continue
    if [ ! -e "$path" ]; then continue; fi
    if [ "$(sha256sum <"$path" | cut -d' ' -f1)" = "$sum" ]; then
      rm -f "$path"
    else
      log "kept $path: it changed since it was installed"; kept=1
    fi
  done <"$manifest"
  # The handler block in containerd 1.x's config.toml; a file left with nothing but its
  # version line was made by the install.
  while read -r kind _ path; do
    [ "$kind" = b ] && [ -f "$path" ] || continue
    printf '%s\n' "$(without_block <"$path")" >"$path.shoji-tmp" && mv -f "$path.shoji-tmp" "$path"
    if [ -z "$(grep -v -e '^version = 2$' -e '^[[:space:]]*$' "$path")" ]; then rm -f "$path"; fi
  done <"$manifest"
  # Deepest first: a directory sorts after its parent.
  dirs=$(awk '$1 == "d" { sub(/^d - /, ""); print }' "$manifest" | sort -r)
  rm -f "$manifest"
  while read -r d; do [ -n "$d" ] && { rmdir "$d" 2>/dev/null || true; }; done <<<"$dirs"
  log "removed shoji from $root"
  exit 0
fi

# ---- what to install ---------------------------------------------------------------------
if [ -z "$bin_dir" ]; then
  bin_dir=${CARGO_TARGET_DIR:-$here/target}/release
  [ -x "$bin_dir/containerd-shim-shoji-v2" ] || bin_dir=${CARGO_TARGET_DIR:-$here/target}/debug
fi
for b in containerd-shim-shoji-v2 shoji; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b missing: cargo build --release -p shoji-shim --bins"
done
cache=${SHOJI_CACHE:-/var/cache/shoji}
for f in vmlinux initramfs.img; do
  [ -f "$cache/$f" ] || die "$cache/$f missing: guest-kernel/build.sh and hack/build-initramfs.sh"
done
if [ "$ctrd_version" = auto ]; then
  if v=$(containerd --version 2>/dev/null); then
    case "$v" in *" v2."*|*" 2."*|*containerd/v2*) ctrd_version=2 ;; *) ctrd_version=1.7 ;; esac
  else
    ctrd_version=1.7
    log "containerd not found: writing the containerd 1.6/1.7 layout (--containerd-version 2 for 2.x)"
  fi
fi
case "$ctrd_version" in 1.6|1.7) ctrd_layout=2 ;; 2|2.*) ctrd_layout=3 ;; *) die "--containerd-version: 1.7 or 2" ;; esac

# A binary the handler files name: absolute, as containerd starts shims with a minimal PATH.
find_bin() {
  local p
  for p in $(echo "${PATH}" | tr ':' ' ') "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/bin /usr/bin; do
    if [ -x "$p/$1" ]; then echo "$p/$1"; return; fi
  done
  log "warning: $1 not found; the handler file names it bare (install it, see docs/operating.md §2)"
  echo "$1"
}

# ---- install -----------------------------------------------------------------------------
declare -a files=() dirs=()
blocks=
# Directories recorded by an earlier run stay ours.
if [ -f "$manifest" ]; then
  while read -r kind _ path; do [ "$kind" = d ] && dirs+=("$path"); done <"$manifest"
fi
make_dir() { # makes a directory and its missing parents, remembering which were new
  local d=$1 missing=()
  while [ ! -d "$d" ]; do missing+=("$d"); d=$(dirname "$d"); done
  local i
  for ((i=${#missing[@]}-1; i>=0; i--)); do mkdir -m 0755 "${missing[$i]}"; dirs+=("${missing[$i]}"); done
}
put() { # put MODE DEST (content on stdin): writes only when it differs
  local mode=$1 dest=$2 tmp
  make_dir "$(dirname "$dest")"
  tmp=$(mktemp "$dest.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then rm -f "$tmp"; else mv -f "$tmp" "$dest"; fi
  files+=("$dest")
}
conf() { # conf DEST (content on stdin): like put, but an existing file that is not ours stays
  local dest=$1
  if [ -f "$dest" ] && ! { [ -f "$manifest" ] && grep -q " $dest\$" "$manifest"; }; then
    local tmp; tmp=$(mktemp); cat >"$tmp"
    if cmp -s "$tmp" "$dest"; then files+=("$dest"); else log "kept your $dest (not written)"; fi
    rm -f "$tmp"
    return
  fi
  put 0644 "$dest"
}

for b in containerd-shim-shoji-v2 shoji; do put 0755 "$prefix/usr/local/bin/$b" <"$bin_dir/$b"; done
put 0644 "$share/vmlinux" <"$cache/vmlinux"
put 0644 "$share/initramfs.img" <"$cache/initramfs.img"

qemu=$(find_bin qemu-system-x86_64)
vhost=$(find_bin vhost-device-vsock)
virtiofsd=$(find_bin virtiofsd)
clh=$(find_bin cloud-hypervisor 2>/dev/null)
conf "$prefix/etc/shoji/qemu.toml" <<EOF
# shoji handler "shoji-qemu" (written by hack/install.sh; see docs/configuration.md)
hypervisor = "qemu"
kernel = "$share/vmlinux"
initrd = "$share/initramfs.img"
log_level = "info"

[qemu]
path = "$qemu"
accel = "auto"
tcg_tb_size_mib = 32

[vhost_device_vsock]
path = "$vhost"

[virtiofsd]
path = "$virtiofsd"
EOF
conf "$prefix/etc/shoji/clh.toml" <<EOF
# shoji handler "shoji" (Cloud Hypervisor; written by hack/install.sh; see docs/configuration.md)
hypervisor = "clh"
kernel = "$share/vmlinux"
initrd = "$share/initramfs.img"
default_vcpus = 1
default_memory_mib = 256
memory_overhead_mib = 64
log_level = "info"

[clh]
path = "$clh"

[virtiofsd]
path = "$virtiofsd"
cache = "auto"
EOF

# containerd: the handlers shoji (Cloud Hypervisor) and shoji-qemu.
handlers() { # handlers TABLE-PREFIX
  cat <<EOF
[$1.shoji]
  runtime_type = "io.containerd.shoji.v2"
[$1.shoji.options]
  ConfigPath = "$prefix/etc/shoji/clh.toml"

[$1.shoji-qemu]
  runtime_type = "io.containerd.shoji.v2"
[$1.shoji-qemu.options]
  ConfigPath = "$prefix/etc/shoji/qemu.toml"
EOF
}
main=$prefix/etc/containerd/config.toml
if [ "$ctrd_layout" = 3 ]; then
  # containerd 2.x merges drop-ins into the plugin sections they name.
  dropin=$( echo "# shoji's handlers for containerd 2.x (written by hack/install.sh)."
    echo "version = 3"; echo
    handlers "plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes" )
  # Not through a pipe: conf records what it writes in this shell.
  conf "$prefix/etc/containerd/conf.d/shoji.toml" <<<"$dropin"
  if [ ! -f "$main" ] || { [ -f "$manifest" ] && grep -q " $main\$" "$manifest"; }; then
    conf "$main" <<EOF
# containerd's defaults plus the drop-ins (written by hack/install.sh: there was no config).
version = 3
imports = ["$prefix/etc/containerd/conf.d/*.toml"]
EOF
  elif ! grep -q 'conf\.d' "$main"; then
    log "add to $main (top level), then restart containerd:"
    log "  imports = [\"$prefix/etc/containerd/conf.d/*.toml\"]"
  fi
else
  # containerd 1.6/1.7 replace a whole plugin section with an imported one (containerd
  # issue 5837): a drop-in would wipe the CRI settings. The tables go into config.toml,
  # between markers, replaced on a rerun and removed by --uninstall.
  block=$( echo "$begin"; handlers 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes'; echo "$end" )
  make_dir "$(dirname "$main")"
  if [ -f "$main" ]; then
    current=$(without_block <"$main")
    if grep -q 'runtime_type = "io.containerd.shoji.v2"' <<<"$current"; then
      log "$main has shoji handlers of its own: not adding the block"
      block=
    fi
  else
    current='version = 2'
  fi
  if [ -n "$block" ]; then
    printf '%s\n\n%s\n' "$current" "$block" >"$main.shoji-tmp"
    if cmp -s "$main.shoji-tmp" "$main"; then rm -f "$main.shoji-tmp"; else mv -f "$main.shoji-tmp" "$main"; fi
    blocks="b - $main"
  fi
fi

put 0644 "$share/runtimeclass.yaml" <<'EOF'
# shoji RuntimeClasses (docs/operating.md §5). Re-measure the overhead per node type.
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: shoji
handler: shoji            # Cloud Hypervisor
overhead:
  podFixed:
    memory: "150Mi"
    cpu: "250m"
---
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: shoji-qemu
handler: shoji-qemu       # QEMU (under TCG its 32 MiB translation cache is part of this)
overhead:
  podFixed:
    memory: "170Mi"
    cpu: "250m"
EOF

# The manifest: every file with its checksum, every directory made (sorted: a rerun
# writes the same manifest).
{
  for f in "${files[@]}"; do echo "f $(sha256sum <"$f" | cut -d' ' -f1) $f"; done
  for d in "${dirs[@]}"; do echo "d - $d"; done
  if [ -n "$blocks" ]; then echo "$blocks"; fi
} | sort -u >"$manifest.new"
mv -f "$manifest.new" "$manifest"
log "installed shoji under $root (containerd $ctrd_version layout); restart containerd to load the handlers"
