#!/usr/bin/env bash
# Container start-up side by side through a private containerd: `ctr run --rm <busybox> true` and CRI
# RunPodSandbox+CreateContainer+StartContainer (+ StopPodSandbox+RemovePodSandbox), min/median/max of N runs
# and the ratio to runc. shoji is included when its shim binary exists.
#
#   hack/bench-ctr.sh [--containerd 1.7|2] [--runs N] [--profile debug|release] [--shoji-config FILE]
#
# Needs hack/install-containerd.sh to have run. Runs as root (containerd, CNI).
set -euo pipefail

cd "$(dirname "$0")/.."
profile=release
pass=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=$2; shift 2 ;;
        --containerd|--runs|--shoji-config) pass+=("$1" "$2"); shift 2 ;;
        *) echo "bench-ctr.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

target="${CARGO_TARGET_DIR:-$PWD/target}"
runtimes=(runc)
shim="$target/$profile/containerd-shim-shoji-v2"
if [ -x "$shim" ]; then
    runtimes+=(shoji)
    pass+=(--shim-dir "$(dirname "$shim")")
else
    echo "bench-ctr.sh: $shim not built; benchmarking runc only" >&2
fi

cargo build -q --release -p shoji-tests --bin bench-ctr
exec "$target/release/bench-ctr" "${pass[@]}" "${runtimes[@]}"
