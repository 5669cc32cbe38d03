#!/usr/bin/env bash
# Installs (or upgrades) shoji on a node, or into a scratch root, and removes it again.
#
#   hack/install.sh [--root DIR] [--bin-dir DIR] [--containerd BIN] [--containerd-config FILE]
#   hack/install.sh --uninstall [--root DIR]
#
# Installs, under DIR (default /):
#   usr/local/bin/{containerd-shim-shoji-v2,shoji}   from --bin-dir (default target/release, else
#                                                    target/debug), replaced by rename: running
#                                                    shims keep the binary they started from
#   usr/share/shoji/boot/<key>/{vmlinux,initramfs.img}  from ${SHOJI_CACHE:-/var/cache/shoji}, one
#                                                    directory per build (<key>: their checksum);
#                                                    boot/current points at the newest. A directory
#                                                    a sandbox booted from stays until no shim holds
#                                                    its in-use.lock (docs/operating.md, upgrading)
#   etc/shoji/{qemu,clh}.toml                        one file per handler (docs/operating.md §3)
#   usr/share/shoji/runtimeclass.yaml                RuntimeClasses with overhead (§5)
#   containerd's handlers shoji (CH) and shoji-qemu, for the containerd BIN (default: on PATH):
#     1.6/1.7: in FILE (default etc/containerd/config.toml), between "# BEGIN shoji handlers" and
#              "# END shoji handlers": 1.x replaces a whole plugin section with an imported one, so
#              a drop-in would wipe the node's CRI settings. A config naming no runtime of its own
#              also gets the default runtime's tables (runc), as `containerd config dump` shows
#              them: 1.x drops its built-in runc as soon as any runtime is named.
#     2.x:     the drop-in etc/containerd/conf.d/shoji.toml (2.x merges drop-ins key by key), in
#              FILE's config version, added to FILE's `imports` unless already covered.
#   A missing FILE is created.
# Before anything is replaced, BIN checks the result: `containerd config dump` of the node's
# config and of the candidate must differ only in shoji's handler tables, and the candidate must
# show the handlers; otherwise the script stops with the reason and changes nothing.
# Paths written into the files point into DIR, so a scratch root is self-contained. Idempotent:
# a second run changes nothing. What it made is listed, with checksums, in
# usr/share/shoji/install-manifest; an edited FILE is kept as it was under usr/share/shoji/backup/.
# --uninstall restores FILE byte for byte (when nobody changed it since; else it removes only
# shoji's lines), removes exactly what the manifest lists (a file changed since is kept and
# named), and keeps boot images a running sandbox still holds. Needs root for / only.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=/
bin_dir=
ctrd=
main=
uninstall=0
log() { echo "[install] $*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --containerd) ctrd=${2:?--containerd needs the containerd binary}; shift 2 ;;
    --containerd-config) main=${2:?--containerd-config needs a file}; shift 2 ;;
    --containerd-version) die "--containerd-version is gone: the layout follows the containerd binary (--containerd BIN)" ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
mkdir -p "$root"
root=$(cd "$root" && pwd)
prefix=${root%/}                     # "" for /
case "$prefix" in *'"'*|*\\*|*"'"*) die "--root $root: quotes and backslashes cannot be written into TOML paths" ;; esac
share=$prefix/usr/share/shoji
manifest=$share/install-manifest
boot=$share/boot
main=${main:-$prefix/etc/containerd/config.toml}
case "$main" in /*) ;; *) main=$PWD/$main ;; esac
dropin=$(dirname "$main")/conf.d/shoji.toml
begin='# BEGIN shoji handlers (hack/install.sh)'
end='# END shoji handlers'
import_mark='# added by hack/install.sh (shoji)'

# Temporary files; candidates staged beside the config (relative imports resolve from there).
work=$(mktemp -d /tmp/shoji-install.XXXXXX)
staged=()
cleanup() { rm -rf "$work"; for s in "${staged[@]}"; do rm -rf -- "$s"; done; }
trap cleanup EXIT

sha() { sha256sum <"$1" | cut -d' ' -f1; }
# The manifest field 2 of entry KIND for PATH (empty when none).
recorded() { [ -f "$manifest" ] && awk -v k="$1" -v p="$2" '$1 == k && $3 == p { print $2; exit }' "$manifest" || true; }

# ---- shoji's lines in a containerd config (both directions) ----------------------------------
# strip_ours FILE: FILE without the handler block (and the blank line before it) and without the
# drop-in in its `imports`.
strip_ours() {
  awk -v b="$begin" -v e="$end" -v q="\"$dropin\"" -v mark="$import_mark" '
    function flush() { if (held) print ""; held = 0 }
    $0 == b { held = 0; skip = 1; next }
    skip { if ($0 == e) skip = 0; next }
    /^[[:space:]]*imports[[:space:]]*=/ && index($0, q) {
      if (index($0, mark)) next
      line = $0
      if ((i = index(line, q ", "))) line = substr(line, 1, i - 1) substr(line, i + length(q) + 2)
      else if ((i = index(line, ", " q))) line = substr(line, 1, i - 1) substr(line, i + length(q) + 2)
      else if ((i = index(line, q))) line = substr(line, 1, i - 1) substr(line, i + length(q))
      flush(); print line; next
    }
    /^$/ { flush(); held = 1; next }
    { flush(); print }
    END { flush() }' "$1"
}
# add_import FILE PATH: FILE with PATH first in its top-level `imports` (a line of its own,
# after `version`, when there is none).
add_import() {
  awk -v q="\"$2\"" -v mark="$import_mark" '
    # First pass: is there a top-level imports key?
    NR == FNR { if (/^[[:space:]]*\[/) nextfile; if (/^[[:space:]]*imports[[:space:]]*=/) has = 1; next }
    !top_done && /^[[:space:]]*\[/ { top_done = 1; if (!done) { print "imports = [" q "] " mark; done = 1 } }
    !top_done && has && !done && /^[[:space:]]*imports[[:space:]]*=/ {
      if (match($0, /\[[[:space:]]*\]/)) $0 = substr($0, 1, RSTART - 1) "[" q "]" substr($0, RSTART + RLENGTH)
      else sub(/\[/, "[" q ", ")
      done = 1
    }
    { print }
    !top_done && !has && !done && /^[[:space:]]*version[[:space:]]*=/ { print "imports = [" q "] " mark; done = 1 }
    END { if (!done) print "imports = [" q "] " mark }' "$1" "$1"
}
# config_version FILE: its top-level `version` (1 when absent, as containerd reads it).
config_version() {
  awk '/^[[:space:]]*\[/ { exit } match($0, /^[[:space:]]*version[[:space:]]*=[[:space:]]*[0-9]+/) {
         v = substr($0, RSTART, RLENGTH); sub(/.*=[[:space:]]*/, "", v); print v; found = 1; exit }
       END { if (!found) print 1 }' "$1"
}
# covered FILE PATH: whether FILE's top-level `imports` already names PATH (or a glob matching it).
covered() {
  local base pattern
  base=$(dirname "$main")
  while IFS= read -r pattern; do
    [ -n "$pattern" ] || continue
    case "$pattern" in /*) ;; *) pattern=$base/$pattern ;; esac
    # shellcheck disable=SC2053 # the pattern is a glob, as containerd reads it
    [[ $2 == $pattern ]] && return 0
  done < <(awk '/^[[:space:]]*\[/ { exit } /^[[:space:]]*imports[[:space:]]*=/ { on = 1 }
                on { print; if (index($0, "]")) exit }' "$1" |
             grep -oE "\"[^\"]*\"|'[^']*'" | sed -e 's/^.//' -e 's/.$//')
  return 1
}
# mentions FILE REGEX: whether a line of FILE that is not a comment matches (one process: a
# `grep | grep -q` pipe can fail under pipefail when -q stops reading early).
mentions() { awk -v re="$2" '!/^[[:space:]]*#/ && $0 ~ re { found = 1; exit } END { exit !found }' "$1"; }
# handlers VERSION: the tables of the handlers shoji (Cloud Hypervisor) and shoji-qemu.
handlers() {
  local t
  case "$1" in
    2) t='plugins."io.containerd.grpc.v1.cri".containerd.runtimes' ;;
    3) t="plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes" ;;
  esac
  cat <<EOF
[$t.shoji]
  runtime_type = "io.containerd.shoji.v2"
[$t.shoji.options]
  ConfigPath = "$prefix/etc/shoji/clh.toml"

[$t.shoji-qemu]
  runtime_type = "io.containerd.shoji.v2"
[$t.shoji-qemu.options]
  ConfigPath = "$prefix/etc/shoji/qemu.toml"
EOF
}
# dump CONFIG OUT: containerd's view of CONFIG (`config dump`), bounded.
dump() { timeout 60 "$ctrd" --config "$1" config dump >"$2" 2>"$2.err"; }
# comparable DUMP: a dump without the handlers' tables, the `imports` list and blank lines.
comparable() {
  awk '/^[[:space:]]*\[/ { skip = ($0 ~ /runtimes\.(shoji|shoji-qemu)(\.options)?\][[:space:]]*$/) }
       /^[[:space:]]*imports[[:space:]]*=/ || /^[[:space:]]*$/ { next }
       !skip { print }' "$1"
}
# default_runtime_tables DUMP: the default runtime's tables in a 1.x dump.
default_runtime_tables() {
  local name
  name=$(sed -n 's/^[[:space:]]*default_runtime_name = "\(.*\)"$/\1/p' "$1" | head -1)
  [[ $name =~ ^[A-Za-z0-9_-]+$ ]] || die "containerd's default runtime name '${name}' is not one this script can write"
  awk -v n="$name" '/^[[:space:]]*\[/ { h = $0; sub(/^[[:space:]]*/, "", h)
                      on = index(h, "containerd.runtimes." n "]") || index(h, "containerd.runtimes." n ".") }
                    on && !/^[[:space:]]*$/ { print }' "$1"
}

# ---- uninstall ---------------------------------------------------------------------------
# prune DIR: removes boot-image directory DIR unless a shim holds its lock (shared, while its
# sandbox lives); returns 1 when kept.
prune() {
  local rc=0
  flock --nonblock --conflict-exit-code 75 --exclusive "$1/in-use.lock" rm -rf -- "$1" || rc=$?
  case $rc in
    0) log "removed boot images $1 (no sandbox uses them)" ;;
    75) log "kept boot images $1: a running sandbox booted from them"; return 1 ;;
    *) die "cannot remove $1" ;;
  esac
}
# Whether a process has PATH open or mapped (sandboxes of installs before the boot directories).
held_by_a_process() {
  local p fd
  for p in /proc/[0-9]*; do
    grep -qsF " $1" "$p/maps" && return 0
    for fd in "$p"/fd/*; do [ "$(readlink "$fd" 2>/dev/null)" = "$1" ] && return 0; done
  done
  return 1
}
# replace DEST SRC: DEST gets SRC's bytes, keeping DEST's mode and owner (rename: atomic).
replace() {
  local tmp
  tmp=$(mktemp "$1.shoji-XXXXXX"); staged+=("$tmp")
  cp -p "$1" "$tmp" && cat "$2" >"$tmp" && mv -f "$tmp" "$1"
}

if [ "$uninstall" = 1 ]; then
  [ -f "$manifest" ] || { log "nothing installed under $root (no $manifest)"; exit 0; }
  while read -r kind sum path backup; do
    case "$kind" in
      c) # a config the install edited: back to what it was, byte for byte
        if [ -f "$path" ] && [ "$(sha "$path")" = "$sum" ] && [ -f "$backup" ]; then
          replace "$path" "$backup"; log "restored $path as it was before the install"
        elif [ -f "$path" ]; then
          strip_ours "$path" >"$work/stripped"; replace "$path" "$work/stripped"
          log "$path changed since the install: removed shoji's lines only, kept the rest"
        fi
        rm -f "$backup" ;;
      b) # the handler block of installs before the backups (it had no `c` entry)
        if [ -f "$path" ]; then
          strip_ours "$path" >"$work/stripped"; replace "$path" "$work/stripped"
          if [ -z "$(grep -v -e '^version = 2$' -e '^[[:space:]]*$' "$path")" ]; then rm -f "$path"; fi
        fi ;;
      f)
        if [ ! -e "$path" ]; then continue; fi
        if [ "$(sha "$path")" = "$sum" ]; then rm -f "$path"; else log "kept $path: it changed since it was installed"; fi ;;
    esac
  done <"$manifest"
  kept=0
  if [ -d "$boot" ]; then
    rm -f "$boot/current"
    for d in "$boot"/*/; do
      if [ -d "$d" ]; then prune "${d%/}" || kept=1; fi
    done
  fi
  # Deepest first: a directory sorts after its parent.
  dirs=$(awk '$1 == "d" { print $3 }' "$manifest" | sort -r)
  rm -f "$manifest"
  while read -r d; do
    if [ -n "$d" ]; then rmdir "$d" 2>/dev/null || true; fi
  done <<<"$dirs"
  if [ "$kept" = 1 ]; then
    # What stays is listed, so that a later --uninstall (once those sandboxes are gone) ends it.
    mkdir -p "$share"
    while read -r d; do
      if [ -d "$d" ]; then echo "d - $d"; fi
    done <<<"$dirs" >"$manifest"
    log "removed shoji from $root, except the boot images above; rerun --uninstall once their pods are gone"
  else
    log "removed shoji from $root"
  fi
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
if [ -z "$ctrd" ]; then
  ctrd=$(command -v containerd) ||
    die "containerd not found on PATH: install it first, or name it with --containerd BIN (it checks the configuration written)"
fi
[ -x "$ctrd" ] || die "--containerd $ctrd is not an executable"
ctrd_version=$(timeout 10 "$ctrd" --version | awk '{ print $3 }') || die "$ctrd --version failed"
case "${ctrd_version#v}" in
  1.6*|1.7*) ctrd_major=1 ;;
  2.*) ctrd_major=2 ;;
  *) die "containerd $ctrd_version ($ctrd): shoji supports 1.6, 1.7 and 2.x" ;;
esac

# A binary the handler files name: absolute, as containerd starts shims with a minimal PATH.
find_bin() {
  local p
  for p in $(echo "${PATH}" | tr ':' ' ') "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/bin /usr/bin; do
    if [ -x "$p/$1" ]; then echo "$p/$1"; return; fi
  done
  log "warning: $1 not found; the handler file names it bare (install it, see docs/operating.md §2)"
  echo "$1"
}

# ---- containerd: plan and check, before anything is written -------------------------------
# The node's configuration without shoji: the backup when the config is as the install left it,
# else the file without shoji's lines; absent when there was none before shoji.
base=$work/base
have_base=1
if [ -f "$main" ]; then
  rec=$(recorded c "$main")
  backup=$(awk -v p="$main" '$1 == "c" && $3 == p { print $4; exit }' "$manifest" 2>/dev/null || true)
  if [ -n "$rec" ] && [ "$(sha "$main")" = "$rec" ] && [ -f "$backup" ]; then
    cp "$backup" "$base"
  elif [ -n "$(recorded f "$main")" ] && [ "$(sha "$main")" = "$(recorded f "$main")" ]; then
    have_base=0                        # the install created it
  else
    strip_ours "$main" >"$base"
    # An install before the backups created it: nothing but the version line is left.
    if [ -n "$(recorded b "$main")" ] && [ -z "$(grep -v -e '^version = 2$' -e '^[[:space:]]*$' "$base")" ]; then
      have_base=0
    fi
  fi
else
  have_base=0
fi
if [ "$have_base" = 1 ]; then
  version=$(config_version "$base")
else
  version=$((ctrd_major == 1 ? 2 : 3))
  echo "version = $version" >"$base"
fi
case "$ctrd_major:$version" in
  1:2|2:2|2:3) ;;
  1:3) die "$main says version = 3, which containerd $ctrd_version does not read (1.x reads version 2)" ;;
  *) die "$main has version = $version (or none): containerd $ctrd_version needs a version 2$([ "$ctrd_major" = 2 ] && echo ' or 3') config; migrate it first (containerd config migrate, 1.7 and later)" ;;
esac
foreign=0
if mentions "$base" 'io\.containerd\.shoji\.v2'; then
  foreign=1
  log "$main has shoji handlers of its own: leaving containerd's configuration alone"
fi

# The node's configuration as containerd reads it.
stage_dir=$work
[ -d "$(dirname "$main")" ] && stage_dir=$(dirname "$main")
base_cfg=$main
if [ "$have_base" = 0 ] || ! cmp -s "$base" "$main"; then
  base_cfg=$stage_dir/.shoji-base.toml; staged+=("$base_cfg"); cp "$base" "$base_cfg"
fi
dump "$base_cfg" "$work/base.dump" ||
  die "containerd $ctrd_version cannot load the node's configuration $main ($(tail -1 "$work/base.dump.err")): fix it first"

# candidate_main DROPIN OUT: the main config as it would be written (2.x: importing DROPIN).
main_action=none
candidate_main() {
  if [ "$ctrd_major" = 1 ]; then
    { if [ "$have_base" = 1 ]; then
        cat "$base"
        [ -z "$(tail -c1 "$base")" ] || echo
      else
        echo "version = 2"
      fi
      echo
      echo "$begin"
      if ! mentions "$base" 'containerd\.runtimes'; then
        echo "# containerd's default runtime, as \`containerd config dump\` shows it built in: 1.x drops"
        echo "# that one once a config names any runtime."
        default_runtime_tables "$work/base.dump"
        echo
      fi
      handlers 2
      echo "$end"
    } >"$2"
  elif [ "$have_base" = 0 ]; then
    printf '# containerd %s with shoji'"'"'s handlers (written by hack/install.sh: there was no config).\nversion = 3\nimports = ["%s"]\n' \
      "$ctrd_version" "$1" >"$2"
  elif covered "$base" "$dropin" && [ "$1" = "$dropin" ]; then
    cp "$base" "$2"
  else
    add_import "$base" "$1" >"$2"
  fi
}
if [ "$foreign" = 0 ]; then
  cand_dropin=
  if [ "$ctrd_major" = 2 ]; then
    { echo "# shoji's handlers (written by hack/install.sh), in the layout of $main's version."
      echo "version = $version"; echo
      handlers "$version"
    } >"$work/dropin"
    cand_dropin=$stage_dir/.shoji-dropin.toml; staged+=("$cand_dropin"); cp "$work/dropin" "$cand_dropin"
  fi
  cand_cfg=$stage_dir/.shoji-candidate.toml; staged+=("$cand_cfg")
  if [ "$ctrd_major" = 2 ] && [ "$have_base" = 1 ] && covered "$base" "$dropin"; then
    add_import "$base" "$cand_dropin" >"$cand_cfg"   # checked through the staged drop-in
  else
    candidate_main "$cand_dropin" "$cand_cfg"
  fi
  dump "$cand_cfg" "$work/cand.dump" ||
    die "containerd $ctrd_version would not load $main with shoji's handlers ($(tail -1 "$work/cand.dump.err")); nothing was changed"
  if ! diff -u <(comparable "$work/base.dump") <(comparable "$work/cand.dump") >"$work/diff"; then
    log "containerd config dump, before and after (beyond shoji's handlers):"
    sed 's/^/[install]   /' "$work/diff" >&2
    die "shoji's handlers would change other settings of containerd $ctrd_version in $main; nothing was changed"
  fi
  for f in clh qemu; do
    grep -Eq "ConfigPath = [\"']$prefix/etc/shoji/$f\.toml[\"']" "$work/cand.dump" ||
      die "containerd $ctrd_version ignores shoji's handler tables in $main (config version $version); nothing was changed"
  done
  candidate_main "$dropin" "$work/main"
  log "checked: containerd $ctrd_version ($ctrd) loads the result, and only shoji's handlers differ"
fi

# ---- install -----------------------------------------------------------------------------
declare -a files=() dirs=()
declare -A kept_files=()
changed=()
entries=()
# Directories recorded by an earlier run stay ours.
if [ -f "$manifest" ]; then
  while read -r kind _ path; do
    if [ "$kind" = d ]; then dirs+=("$path"); fi
  done <"$manifest"
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
  tmp=$(mktemp "$dest.XXXXXX"); staged+=("$tmp")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then rm -f "$tmp"; else mv -f "$tmp" "$dest"; changed+=("$dest"); fi
  files+=("$dest")
}
conf() { # conf DEST (content on stdin): like put, but a file that is not ours as installed stays
  local dest=$1 rec
  rec=$(recorded f "$dest")
  if [ -f "$dest" ] && { [ -z "$rec" ] || [ "$(sha "$dest")" != "$rec" ]; }; then
    cat >"$work/conf"
    if cmp -s "$work/conf" "$dest"; then files+=("$dest"); else log "kept your $dest (not written)"; kept_files[$dest]=1; fi
    return
  fi
  put 0644 "$dest"
}

for b in containerd-shim-shoji-v2 shoji; do put 0755 "$prefix/usr/local/bin/$b" <"$bin_dir/$b"; done

# Boot images: a directory per build, made whole before it gets its name.
key=$(cat "$cache/vmlinux" "$cache/initramfs.img" | sha256sum | cut -c1-16)
make_dir "$boot"
if [ ! -d "$boot/$key" ]; then
  part=$(mktemp -d "$boot/.partial.XXXXXX"); staged+=("$part")
  cp "$cache/vmlinux" "$part/vmlinux"
  cp "$cache/initramfs.img" "$part/initramfs.img"
  : >"$part/in-use.lock"
  chmod 0644 "$part"/*; chmod 0755 "$part"
  mv -T "$part" "$boot/$key"
  changed+=("$boot/$key")
fi

qemu=$(find_bin qemu-system-x86_64)
vhost=$(find_bin vhost-device-vsock)
virtiofsd=$(find_bin virtiofsd)
clh=$(find_bin cloud-hypervisor 2>/dev/null)
conf "$prefix/etc/shoji/qemu.toml" <<EOF
# shoji handler "shoji-qemu" (written by hack/install.sh; see docs/configuration.md)
hypervisor = "qemu"
kernel = "$boot/current/vmlinux"
initrd = "$boot/current/initramfs.img"
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
kernel = "$boot/current/vmlinux"
initrd = "$boot/current/initramfs.img"
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

# New sandboxes boot from the new images from here on (a rename: atomic).
if [ "$(readlink "$boot/current" 2>/dev/null)" != "$key" ]; then
  ln -sfn "$key" "$boot/.current.new"; staged+=("$boot/.current.new")
  mv -T "$boot/.current.new" "$boot/current"
  changed+=("$boot/current -> $key")
fi

# containerd's configuration, last: the handlers it loads now find everything in place.
ctrd_changed=0
if [ "$foreign" = 0 ]; then
  if [ "$ctrd_major" = 2 ]; then
    before=$(sha "$dropin" 2>/dev/null || true)
    conf "$dropin" <"$work/dropin"
    [ "$before" = "$(sha "$dropin")" ] || { ctrd_changed=1; log "wrote $dropin (shoji's handlers, config version $version)"; }
  fi
  if [ "$have_base" = 0 ]; then
    before=$(sha "$main" 2>/dev/null || true)
    put 0644 "$main" <"$work/main"
    [ "$before" = "$(sha "$main")" ] || { ctrd_changed=1; log "created $main ($([ "$ctrd_major" = 1 ] && echo "with shoji's handler block" || echo "importing $dropin"))"; }
  elif cmp -s "$work/main" "$base"; then
    log "left $main as it was: it already imports $dropin"
    [ ! -f "$main" ] || cmp -s "$main" "$base" || { replace "$main" "$base"; ctrd_changed=1; log "removed an older install's lines from $main"; }
  else
    backup=$share/backup${main#"$prefix"}
    make_dir "$(dirname "$backup")"
    [ -f "$backup" ] && cmp -s "$backup" "$base" || { cp -p "$main" "$backup" 2>/dev/null || true; cat "$base" >"$backup"; }
    if ! cmp -s "$work/main" "$main"; then
      replace "$main" "$work/main"; ctrd_changed=1
      if [ "$ctrd_major" = 1 ]; then
        log "changed $main: shoji's handler block ('$begin' .. '$end')"
      else
        log "changed $main: $dropin added to its imports"
      fi
      log "  (as it was before: $backup; --uninstall puts it back)"
    fi
    entries+=("c $(sha "$main") $main $backup")
  fi
fi

# Boot images of earlier builds go once no sandbox holds them.
for d in "$boot"/*/; do
  d=${d%/}
  [ -L "$d" ] || [ "$(basename "$d")" = "$key" ] || prune "$d" || true
done
# Files an earlier install listed and this one does not (e.g. boot images of installs before
# the boot directories): removed when unchanged and no process (a running VM) has them open.
declare -A listed=()
for f in "${files[@]}"; do listed[$f]=1; done
if [ -f "$manifest" ]; then
  while read -r kind sum path; do
    [ "$kind" = f ] && [ -f "$path" ] || continue
    [ -z "${listed[$path]:-}" ] && [ -z "${kept_files[$path]:-}" ] && [ "$path" != "$main" ] || continue
    if [ "$(sha "$path")" != "$sum" ]; then
      log "left $path: no longer installed, but changed since"
    elif held_by_a_process "$path" || grep -qsF "$path" "$prefix"/etc/shoji/*.toml; then
      log "kept $path: a running sandbox or a handler file still uses it"
      entries+=("f $sum $path")
    else
      rm -f "$path"; log "removed $path (no longer installed)"
    fi
  done <"$manifest"
fi

# The manifest: every file with its checksum, every directory made (sorted: a rerun writes
# the same manifest).
{
  for f in "${files[@]}"; do echo "f $(sha "$f") $f"; done
  for d in "${dirs[@]}"; do
    if [ -d "$d" ]; then echo "d - $d"; fi
  done
  for e in "${entries[@]}"; do echo "$e"; done
} | sort -u >"$manifest.new"
mv -f "$manifest.new" "$manifest"

for c in "${changed[@]}"; do log "installed $c"; done
log "boot images: $boot/$key (new sandboxes boot from $boot/current)"
if [ "$foreign" = 1 ]; then
  log "installed shoji under $root; containerd's configuration was left alone (it has shoji handlers of its own)"
elif [ "$ctrd_changed" = 1 ]; then
  log "installed shoji under $root; restart containerd to load the handlers (systemctl restart containerd: running pods keep running), then: shoji check"
else
  log "installed shoji under $root; containerd's configuration is unchanged: no restart needed"
fi
