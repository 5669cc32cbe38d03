#!/usr/bin/env bash
# Builds the shoji guest kernel (vmlinux) from Debian's linux-source package, with the
# patches in patches/ (each says why). The result is cached outside the checkout, keyed by
# the config fragment, the patches, this script and the source package version, so reruns
# (and CI) skip the ~12 min build.
#
#   guest-kernel/build.sh            # prints the path of the built vmlinux on its last line
#   SHOJI_CACHE=/path guest-kernel/build.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SHOJI_CACHE:-/var/cache/shoji}
series=6.1
pkg=linux-source-$series
log() { echo "[guest-kernel] $*" >&2; }

if ! dpkg -s "$pkg" >/dev/null 2>&1 || ! command -v patch >/dev/null; then
  log "installing $pkg and the kernel build tools"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" build-essential patch flex bison bc libelf-dev libssl-dev xz-utils >&2
fi
srcver=$(dpkg-query -W -f='${Version}' "$pkg")
patches=("$here"/patches/*.patch)
patched=$(cat "${patches[@]}" | sha256sum | cut -c1-16)
key=$( (cat "$here/shoji.config" "$here/build.sh" "${patches[@]}"; echo "$srcver") | sha256sum | cut -c1-16)
out=$cache/kernel/$key
if [ -f "$out/vmlinux" ]; then
  log "cached: $out/vmlinux ($pkg $srcver, key $key)"
  ln -sfn "$out/vmlinux" "$cache/vmlinux"
  echo "$out/vmlinux"
  exit 0
fi

mkdir -p "$cache/kernel"
work=$cache/kernel/build-$series
if [ ! -f "$work/.extracted-$srcver-$patched" ]; then
  log "extracting $pkg $srcver and applying ${#patches[@]} patches"
  rm -rf "$work" && mkdir -p "$work"
  tar -xaf /usr/src/$pkg.tar.xz -C "$work" --strip-components=1
  for p in "${patches[@]}"; do
    patch -d "$work" -p1 --forward --quiet <"$p" || { log "patch does not apply: $p"; exit 1; }
  done
  touch "$work/.extracted-$srcver-$patched"
fi
cd "$work"
log "configuring: tinyconfig + $(grep -c '=y' "$here/shoji.config") options"
make -s tinyconfig >/dev/null 2>&1
KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$here/shoji.config" >/dev/null 2>&1
make -s olddefconfig >&2
# Every option the fragment asks for must have survived dependency resolution.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=y) grep -qx "$line" .config || { log "option not set: $line"; missing=1; } ;;
    "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}
      grep -q "^$opt=" .config && { log "option should be off: $opt"; missing=1; } ;;
  esac
done < "$here/shoji.config"
[ "$missing" = 0 ] || { log "the config fragment does not apply cleanly to $pkg $srcver"; exit 1; }

jobs=$(nproc)
log "building vmlinux with -j$jobs (about 12 minutes on 2 cores); progress every 200 objects"
start=$(date +%s)
make -j"$jobs" vmlinux 2>&1 | awk '/^  CC /{n++; if (n%200==0) {printf "[guest-kernel] %d objects compiled\n", n > "/dev/stderr"}} /error|Error/{print > "/dev/stderr"}'
[ "${PIPESTATUS[0]}" = 0 ] || { log "build failed"; exit 1; }
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
rm -rf "$out" && mv "$out.tmp" "$out"
ln -sfn "$out/vmlinux" "$cache/vmlinux"
log "built in $(( $(date +%s) - start )) s: $out/vmlinux"
echo "$out/vmlinux"
