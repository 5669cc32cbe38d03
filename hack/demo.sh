#!/usr/bin/env bash
# The main job: sets the host up (hack/setup.sh), then
#  1. boots a throwaway microVM and prints `uname -a` from a busybox container inside it
#     (the guest's kernel, not the host's), and
#  2. runs a pod the way kubelet does (CRI on a private containerd, runtime handler `shoji`,
#     a CNI bridge on a subnet only the demo uses): busybox httpd in its own microVM, its
#     page fetched from the host at the pod IP, then the pod removed and leak-checked.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
hack/setup.sh
echo "== host:  $(uname -sr)"
echo -n "== guest: "
"${CARGO_TARGET_DIR:-target}/debug/shoji" vm run -- uname -a
echo
cargo build -q -p shoji-tests --bin demo-pod
"${CARGO_TARGET_DIR:-target}/debug/demo-pod"
