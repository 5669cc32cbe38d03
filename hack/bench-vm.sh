#!/usr/bin/env bash
# Boot benchmark (not a test): RUNS throwaway VMs one after another (default 10), each
# measured from VMM launch to the agent's answer, with the agent's RSS, the guest's used
# memory and the host RSS of QEMU, virtiofsd and vhost-device-vsock. Prints a Markdown
# table (min / median / max) and the targets.
#
#   hack/bench-vm.sh            RUNS=20 hack/bench-vm.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
cargo build -q --release -p shoji-shim --bin shoji
echo "== $(date -u +%FT%TZ), $(nproc) cores, $("${CARGO_TARGET_DIR:-target}/release/shoji" check 2>/dev/null | grep accelerator | sed 's/  */ /g')"
"${CARGO_TARGET_DIR:-target}/release/shoji" vm bench --runs "${RUNS:-10}"
echo
echo "targets: ready median <= 600 ms, agent RSS <= 8 MiB, guest used <= 32 MiB"
