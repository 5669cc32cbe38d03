#!/usr/bin/env bash
# Validates a node for shoji in one command: the whole test suite on one backend, the start-up
# and memory benchmarks, and a Markdown report (versions, pass/fail per test, boot breakdown,
# per-pod memory against Kata's published ~124 MiB). What to run on a KVM node with Cloud
# Hypervisor before putting CH in production (docs/cloud-hypervisor.md).
#
#   hack/validate-node.sh                        # Cloud Hypervisor: every test, 10 benchmark runs
#   hack/validate-node.sh --hypervisor qemu      # the same on QEMU (any host; TCG without KVM)
#
# Options:
#   --hypervisor clh|qemu  the backend under test (default clh; SHOJI_TEST_HYPERVISOR for the tests)
#   --tests FILTERSET      a nextest filterset: only these tests (default: every test of the
#                          workspace, with clh also the ignored real-CH test clh_e2e)
#   --runs N               runs of each benchmark (default 10)
#   --containerd 1.7|2     the containerd of the benchmarks (default 2; the tests use both)
#   --profile release|debug  build of the benchmarked binaries (default release)
#   --no-bench             tests only
#   --report FILE          the report (default ./validate-node-<host>-<hypervisor>-<UTC time>.md)
#
# Needs root, as hack/test.sh. With clh: a KVM that runs ordinary guests and cloud-hypervisor
# on the PATH (e.g. /usr/local/bin); the script stops at once, with the reason, where CH cannot
# run. Exit status 0 only if every selected test passed and the benchmarks ran.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
started=$(date +%s)

hv=clh tests="" runs=10 ctrd=2 profile=release bench=1 report=""
while [ $# -gt 0 ]; do
  case "$1" in
    --hypervisor) hv=$2; shift 2 ;;
    --tests) tests=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --containerd) ctrd=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --no-bench) bench=0; shift ;;
    --report) report=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "validate-node.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$hv" in clh|qemu) ;; *) echo "validate-node.sh: --hypervisor clh or qemu" >&2; exit 2 ;; esac
case "$profile" in release|debug) ;; *) echo "validate-node.sh: --profile release or debug" >&2; exit 2 ;; esac
[ -n "$report" ] || report="$PWD/validate-node-$(hostname -s)-$hv-$(date -u +%Y%m%dT%H%M%SZ).md"
target="${CARGO_TARGET_DIR:-$root/target}"
say() { echo "== validate-node: $*" >&2; }

# 1. Can the backend run here? (seconds: shoji-probe needs only libc)
cargo build -q -p shoji-probe --bin shoji-probe || exit 1
if [ "$hv" = clh ]; then
  if ! why=$("$target/debug/shoji-probe" clh); then
    echo "== validate-node: Cloud Hypervisor cannot run guests here: $why" >&2
    exit 1
  fi
  say "Cloud Hypervisor: $why"
fi

work=$(mktemp -d /tmp/validate-node.XXXXXX)

# 2. The host set up as for hack/test.sh (packages, daemons, containerd, kernel, initramfs, shim).
say "hack/setup.sh (log: $work/setup.log)"
if ! hack/setup.sh >"$work/setup.log" 2>&1; then
  tail -20 "$work/setup.log" >&2
  say "FAILED in hack/setup.sh (full log: $work/setup.log)"
  exit 1
fi
printf 'hypervisor = "%s"\n' "$hv" >"$work/shoji.toml"

# 3. Versions and `shoji check` for the backend under test.
{
  echo "shoji: $(git describe --always --dirty 2>/dev/null || echo unknown) ($(git log -1 --format=%cs 2>/dev/null))"
  echo "host: $(uname -sr), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kvm: $("$target/debug/shoji-probe" kvm)"
  if [ "$hv" = clh ]; then
    echo "cloud-hypervisor: $(cloud-hypervisor --version 2>&1 | head -1) ($(command -v cloud-hypervisor))"
  else
    echo "qemu: $(qemu-system-x86_64 --version | head -1)"
    echo "vhost-device-vsock: $(vhost-device-vsock --version 2>&1 | head -1)"
  fi
  echo "virtiofsd: $(virtiofsd --version 2>&1 | head -1)"
  cache=${SHOJI_CACHE:-/var/cache/shoji}
  for v in 1.7 2; do
    echo "containerd $v (tests): $("$cache/containerd/$v/usr/bin/containerd" --version 2>&1 | awk '{print $3}')"
  done
  echo "guest kernel: $(readlink -f "$cache/vmlinux")"
  echo "guest initramfs: $(readlink -f "$cache/initramfs.img")"
} >"$work/versions.txt" 2>&1
"$target/debug/shoji" --config "$work/shoji.toml" check >"$work/check.txt" 2>&1
check_rc=$?

# 4. The suite on the backend under test, with a JUnit report.
filter=${tests:-all()}
args=(--workspace --profile validate --no-fail-fast)
if [ "$hv" = clh ]; then
  # clh_e2e's real-CH test is ignored unless asked for; the vsock-daemon faults are QEMU's.
  args+=(--run-ignored all -E "($filter) and not test(/^vsock_daemon/)")
else
  args+=(-E "$filter")
fi
say "tests: SHOJI_TEST_HYPERVISOR=$hv cargo nextest run ${args[*]} (log: $work/tests.log)"
SHOJI_TEST_HYPERVISOR=$hv cargo nextest run "${args[@]}" >"$work/tests.log" 2>&1
tests_rc=$?
junit="$target/nextest/validate/junit.xml"
[ -f "$junit" ] && cp "$junit" "$work/junit.xml"
grep -E '^\s+Summary' "$work/tests.log" >&2 || tail -5 "$work/tests.log" >&2

# 5. Benchmarks: runc and shoji side by side through containerd (start-up, the shim's boot
#    breakdown, idle memory per pod), and bare VM boots (`shoji vm bench`).
bench_rc=0
if [ "$bench" = 1 ]; then
  say "benchmarks: $runs runs, containerd $ctrd, $profile build (log: $work/bench-*.txt)"
  p=(); [ "$profile" = release ] && p=(--release)
  if cargo build -q "${p[@]}" -p shoji-shim --bins && cargo build -q "${p[@]}" -p shoji-tests --bin bench-ctr; then
    "$target/$profile/bench-ctr" --containerd "$ctrd" --runs "$runs" --shim-dir "$target/$profile" \
      --shoji-config "$work/shoji.toml" runc shoji >"$work/bench-ctr.txt" 2>&1 || bench_rc=1
    "$target/$profile/shoji" --config "$work/shoji.toml" vm bench --runs "$runs" \
      >"$work/bench-vm.txt" 2>&1 || bench_rc=1
  else
    bench_rc=1
  fi
fi

# 6. The report.
python3 - "$work" "$hv" "$bench" "$check_rc" "$tests_rc" "$bench_rc" "$(( $(date +%s) - started ))" "$filter" >"$report" <<'EOF'
import os, re, sys, xml.etree.ElementTree as ET
work, hv, bench, check_rc, tests_rc, bench_rc, took, filt = sys.argv[1:]
name = {"clh": "Cloud Hypervisor", "qemu": "QEMU"}[hv]
read = lambda f: open(os.path.join(work, f), errors="replace").read() if os.path.exists(os.path.join(work, f)) else ""
out = [f"# shoji node validation: {name}", ""]
out += ["## Versions", "", "```", read("versions.txt").rstrip(), "```", ""]
out += [f"## `shoji check` (hypervisor = \"{hv}\"; exit {check_rc})", "", "```", read("check.txt").rstrip(), "```", ""]

cases = []
if read("junit.xml"):
    for case in ET.fromstring(read("junit.xml")).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            verdict = "FAIL"
        elif case.find("skipped") is not None:
            verdict = "skipped"
        else:
            verdict = "pass"
        flaky = case.find("flakyFailure") is not None or case.find("rerunFailure") is not None
        cases.append((case.get("classname", ""), case.get("name", ""), verdict + (" (flaky)" if flaky else ""), float(case.get("time") or 0)))
passed = sum(c[2].startswith("pass") for c in cases)
failed = [c for c in cases if c[2] == "FAIL"]
out += [f"## Tests: {passed} passed, {len(failed)} failed of {len(cases)} (SHOJI_TEST_HYPERVISOR={hv}, filter `{filt}`)", ""]
if not cases:
    out += ["No JUnit report: the test run did not get that far. The end of its log:", "", "```", "\n".join(read("tests.log").splitlines()[-30:]), "```", ""]
if failed:
    out += ["Failed: " + ", ".join(f"`{c[0]} {c[1]}`" for c in failed), ""]
out += ["| test | result | s |", "|---|---|---|"]
out += [f"| {c[0]} {c[1]} | {c[2]} | {c[3]:.1f} |" for c in sorted(cases)]
out.append("")

if bench == "1":
    ctr = read("bench-ctr.txt")
    out += ["## Start-up and boot breakdown", ""]
    m = re.search(r"shoji start-up breakdown.*?(?=\n\S|\Z)", ctr, re.S)
    out += ["Through containerd (the shim's own log, median over the benchmark's pods):", "", "```", m.group(0).rstrip() if m else "(missing: see bench-ctr.txt)", "```", ""]
    out += ["Bare VM boots (`shoji vm bench`):", "", read("bench-vm.txt").rstrip() or "(missing)", ""]
    table = "\n".join(l for l in ctr.splitlines() if l.startswith("|"))
    out += ["runc and shoji side by side (`bench-ctr`):", "", table or "(missing: see bench-ctr.txt)", ""]
    out += ["## Memory per pod", ""]
    m = re.search(r"shoji: host memory of one idle container.*?\n  total\s+([\d.]+)\s+([\d.]+)\n(  density[^\n]*\n)?", ctr, re.S)
    if m:
        pss = float(m.group(2))
        out += ["```", m.group(0).rstrip(), "```", "",
                f"shoji's idle pod: **{pss:.1f} MiB PSS** (VMM, virtiofsd{', vhost-device-vsock' if hv == 'qemu' else ''} and the shim). "
                f"Kata Containers publishes ~124 MiB per pod (PSS of VMM + virtiofsd + shim, Cloud Hypervisor, 2 GiB guest): "
                f"shoji uses **{pss / 124 * 100:.0f} %** of that. Note the guest size: shoji's default is 256 MiB; untouched guest memory costs no host memory with either.", ""]
    else:
        out += ["(missing: the memory part of bench-ctr did not run; see bench-ctr.txt)", ""]
out += [f"## Verdict", ""]
ok = tests_rc == "0" and bench_rc == "0" and cases
out += [("PASS" if ok else "FAIL") + f": tests exit {tests_rc}, benchmarks exit {bench_rc}{' (skipped)' if bench != '1' else ''}; {took} s. Raw outputs: `{work}`."]
print("\n".join(out))
EOF

cat "$report"
echo
say "report: $report (raw outputs in $work)"
if [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ -f "$work/junit.xml" ]; then
  say "PASS ($(( $(date +%s) - started )) s)"
  exit 0
fi
say "FAIL (tests exit $tests_rc, benchmarks exit $bench_rc)"
exit 1
