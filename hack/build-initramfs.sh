#!/usr/bin/env bash
# Builds the shoji guest initramfs: /init = the static shoji-agent, /dev/console, and the
# directories PID 1 needs before it mounts anything.
# Cached outside the checkout, keyed by the agent binary and this script:
#   ${SHOJI_CACHE:-/var/cache/shoji}/initramfs/<key>/initramfs.img, linked from
#   ${SHOJI_CACHE}/initramfs.img. Progress goes to stderr; the last stdout line is the path.
#
#   hack/build-initramfs.sh
#   SHOJI_INITRAMFS_COMPRESSION=gzip|lz4|zstd|none hack/build-initramfs.sh   (default: lz4)
#
# lz4 is the default because the guest decompresses it fastest (measured under TCG, see
# docs); gzip/zstd give a smaller file. Needs root (mknod) and cpio.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${SHOJI_CACHE:-/var/cache/shoji}
compression=${SHOJI_INITRAMFS_COMPRESSION:-lz4}
target=x86_64-unknown-linux-gnu
log() { echo "[initramfs] $*" >&2; }

case "$compression" in
  gzip) compress=(gzip -9 -n) ;;
  lz4) compress=(lz4 -l -9 -q) ;; # -l: the legacy frame format the kernel's unlz4 reads
  zstd) compress=(zstd -19 -q) ;;
  none) compress=(cat) ;;
  *) log "unknown SHOJI_INITRAMFS_COMPRESSION=$compression (gzip, lz4, zstd, none)"; exit 2 ;;
esac

log "building shoji-agent (release, size-optimized, static glibc, libseccomp linked statically)"
(
  cd "$here"
  # musl is not available; crt-static gives a static glibc binary. libseccomp.a comes
  # from Debian's libseccomp-dev. The release profile (size, fat LTO, one codegen unit)
  # keeps the stripped agent small (6.9 MB): less to unpack at every boot and less guest
  # memory (the initramfs stays in RAM). Non-PIE (relocation-model=static) spares every agent
  # and helper start its self-relocation (~60 ms less boot under TCG).
  # Only this target directory (--target) is built with these settings.
  LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=${LIBSECCOMP_LIB_PATH:-/usr/lib/x86_64-linux-gnu} \
    RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static' \
    cargo build --release --target "$target" -p shoji-agent >&2
)
bin=${CARGO_TARGET_DIR:-$here/target}/$target/release/shoji-agent
if ! file "$bin" | grep -Eq 'static(-pie)? linked|statically linked'; then
  log "$bin is not statically linked: $(file -b "$bin")"
  exit 1
fi

key=$( (sha256sum <"$bin"; sha256sum <"$0"; echo "$compression") | sha256sum | cut -c1-16)
out=$cache/initramfs/$key
img=$out/initramfs.img
if [ -f "$img" ]; then
  log "cached: $img"
else
  mkdir -p "$cache/initramfs"
  stage=$(mktemp -d "$cache/initramfs/.stage.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  root=$stage/root
  mkdir -p "$root"/{dev,proc,sys,run,tmp}
  # Symbols are not needed in the guest and would double the image.
  strip -o "$root/init" "$bin" && chmod 0755 "$root/init"
  # The kernel opens /dev/console for PID 1's stdio before anything is mounted.
  mknod -m 0600 "$root/dev/console" c 5 1
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | "${compress[@]}" >"$stage/initramfs.img"
  mkdir -p "$out"
  mv "$stage/initramfs.img" "$img.tmp" && mv "$img.tmp" "$img"
  log "built: $img ($(stat -c %s "$img") bytes, $compression; /init $(stat -c %s "$root/init") bytes)"
fi
ln -sfn "$img" "$cache/initramfs.img"
# Keep the three most recent builds (a VM may still be booting from the previous one).
touch "$out"
ls -1dt "$cache"/initramfs/*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf
echo "$img"
