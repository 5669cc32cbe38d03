#!/usr/bin/env bash
# Sets the host up (hack/setup.sh) and runs every test of the workspace: unit tests and the
# integration tests with real VMs and a real containerd. Prints a summary at the end.
#
#   hack/test.sh                 # everything
#   hack/test.sh -E 'binary(/^vm_/)'   # extra arguments go to cargo nextest run
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
start=$(date +%s)

if ! hack/setup.sh; then
  echo "== hack/test.sh: FAILED in setup after $(( $(date +%s) - start )) s" >&2
  exit 1
fi

log=$(mktemp /tmp/shoji-test.XXXXXX.log)
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
else
  cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
fi
rc=${PIPESTATUS[0]}

echo
echo "== hack/test.sh summary ($(( $(date +%s) - start )) s)"
grep -E '^\s+Summary|^test result:' "$log" || true
grep -E '^\s+(FAIL|TIMEOUT|SIGSEGV|SIGABRT) \[' "$log" | sort -u || true
if [ "$rc" = 0 ]; then echo "== PASS"; else echo "== FAIL (exit $rc; full log: $log)"; fi
exit "$rc"
