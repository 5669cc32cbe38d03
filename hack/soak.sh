#!/usr/bin/env bash
# Soak benchmark: N pod cycles through CRI (RunPodSandbox, 2 containers, exec, log, stop,
# remove) on a private containerd, with a leak check after every cycle and the shim's fds
# and the VM processes' memory every 50 cycles (tests/src/bin/soak.rs).
#
#   hack/soak.sh [--cycles N] [--every N] [--containerd 1.7|2]
#
# Needs hack/setup.sh to have run. Runs as root. Not a CI test: 200 cycles take ~10 min.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p shoji-shim --bins
cargo build -q --release -p shoji-tests --bin soak
target="${CARGO_TARGET_DIR:-$PWD/target}"
exec "$target/release/soak" --shim-dir "$target/debug" "$@"
