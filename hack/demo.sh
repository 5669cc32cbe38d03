#!/usr/bin/env bash
# Sets the host up (hack/setup.sh), then boots a throwaway microVM and prints `uname -a`
# from a busybox container inside it: the guest's kernel, not the host's.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
hack/setup.sh
echo "== host:  $(uname -sr)"
echo -n "== guest: "
target/debug/shoji vm run -- uname -a
