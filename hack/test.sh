#!/usr/bin/env bash
# Sets the host up (hack/setup.sh) and runs every test of the workspace: unit tests and the
# integration tests with real VMs and a real containerd. Prints a summary at the end.
#
#   hack/test.sh                 # everything
#   hack/test.sh -E 'binary(/^vm_/)'   # extra arguments go to cargo nextest run
#   SHOJI_TEST_HYPERVISOR=clh hack/test.sh   # the VM and containerd tests on Cloud Hypervisor
#                                            # (a KVM node with cloud-hypervisor installed;
#                                            # hack/validate-node.sh adds benchmarks and a report)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
start=$(date +%s)

# SHOJI_TEST_HYPERVISOR selects the VMM of the VM and containerd tests (tests/src/backend.rs):
# qemu (the default) or clh. Where Cloud Hypervisor cannot run guests, say so now, before
# anything heavy is built (shoji-probe needs only libc and builds in seconds).
case "${SHOJI_TEST_HYPERVISOR:-qemu}" in
  qemu) ;;
  clh)
    cargo build -q -p shoji-probe --bin shoji-probe || exit 1
    if ! why=$("${CARGO_TARGET_DIR:-target}/debug/shoji-probe" clh); then
      echo "== hack/test.sh: SHOJI_TEST_HYPERVISOR=clh, but Cloud Hypervisor cannot run guests here: $why" >&2
      exit 1
    fi
    echo "== hack/test.sh: Cloud Hypervisor: $why" >&2
    ;;
  *)
    echo "== hack/test.sh: SHOJI_TEST_HYPERVISOR=$SHOJI_TEST_HYPERVISOR: use qemu or clh" >&2
    exit 2
    ;;
esac

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
