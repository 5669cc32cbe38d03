#!/usr/bin/env bash
# Prepares this host to build, run and test shoji. Idempotent: each step skips what is
# already in place, so rerunning it (as hack/test.sh and hack/demo.sh do) is cheap.
#
#   hack/setup.sh
#
# Steps, in order (keep it a plain sequence; add a step as one line in main()):
#   1. Debian packages (QEMU, kernel build deps, busybox-static, containerd, runc, CNI, ...)
#   2. virtiofsd and vhost-device-vsock (cargo install, only if missing)
#   3. containerd 1.7 / 2.x side by side for the tests (hack/install-containerd.sh)
#   4. the guest kernel (guest-kernel/build.sh, cached in ${SHOJI_CACHE:-/var/cache/shoji})
#   5. the guest initramfs with shoji-agent (hack/build-initramfs.sh, cached likewise)
#   6. the host binaries: containerd-shim-shoji-v2 and shoji (target/debug)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
log() { echo "[setup] $*" >&2; }

APT_PACKAGES=(
  qemu-system-x86 linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils
  busybox-static cpio gzip lz4 containerd runc containernetworking-plugins iproute2 iptables
  protobuf-compiler libseccomp-dev libcap-ng-dev pkg-config zlib1g-dev
)

apt_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "Debian packages: all present"
    return
  fi
  log "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
}

cargo_tools() {
  for tool in virtiofsd vhost-device-vsock; do
    if command -v "$tool" >/dev/null; then
      log "$tool: $(command -v "$tool")"
    else
      log "cargo install $tool (about a minute)"
      cargo install --locked -q "$tool" >&2
    fi
  done
}

containerd_versions() {
  if [ -x hack/install-containerd.sh ]; then
    hack/install-containerd.sh >&2
  fi
}

guest_kernel() {
  guest-kernel/build.sh >/dev/null
  log "guest kernel: $(readlink -f "${SHOJI_CACHE:-/var/cache/shoji}/vmlinux")"
}

guest_initramfs() {
  hack/build-initramfs.sh >/dev/null
  log "guest initramfs: $(readlink -f "${SHOJI_CACHE:-/var/cache/shoji}/initramfs.img")"
}

host_binaries() {
  log "building containerd-shim-shoji-v2 and shoji"
  cargo build -q -p shoji-shim --bins >&2
}

main() {
  apt_packages
  cargo_tools
  containerd_versions
  guest_kernel
  guest_initramfs
  host_binaries
  local shoji=${CARGO_TARGET_DIR:-$root/target}/debug/shoji
  log "done: $shoji check"
  "$shoji" check >&2 || { log "shoji check reports a missing piece"; exit 1; }
}

main "$@"
