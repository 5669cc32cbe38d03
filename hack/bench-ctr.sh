#!/usr/bin/env bash
# runc and shoji side by side through a private containerd, in one run: `ctr run --rm true`, CRI
# pod start / ExecSync / stop+remove / 10 pods at once, a container's stdout throughput, dd in its
# filesystem and in a volume (and on the host), idle memory and pod density; min/median/max of N
# runs and the ratio to runc, the shim's start-up breakdown, and docs/benchmarks.svg (the ratios).
# shoji is included when its shim binary exists (built here for the chosen profile).
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
if [ "$profile" = release ]; then
    cargo build -q --release -p shoji-shim --bins
else
    cargo build -q -p shoji-shim --bins
fi
runtimes=(runc)
shim="$target/$profile/containerd-shim-shoji-v2"
if [ -x "$shim" ]; then
    runtimes+=(shoji)
    pass+=(--shim-dir "$(dirname "$shim")")
else
    echo "bench-ctr.sh: $shim not built; benchmarking runc only" >&2
fi

cargo build -q --release -p shoji-tests --bin bench-ctr
exec "$target/release/bench-ctr" --plot docs/benchmarks.svg "${pass[@]}" "${runtimes[@]}"
