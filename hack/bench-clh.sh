#!/usr/bin/env bash
# Cloud Hypervisor next to QEMU (a benchmark, not a test). For each backend it boots RUNS
# throwaway sandboxes one after another (`shoji vm bench`) and reports min / median / max of:
#   - VMM start → agent ready (ms);
#   - host memory per sandbox: the RSS of all its processes together (VMM + virtiofsd
#     [+ vhost-device-vsock for QEMU]), and of the VMM alone (MiB);
#   - guest used memory (MiB).
#
#   hack/bench-clh.sh            RUNS=20 hack/bench-clh.sh            CLH=/path/to/cloud-hypervisor hack/bench-clh.sh
#
# CH needs a KVM that runs ordinary guests. On a host without one (e.g. PVM, like the
# development machine), the script says so, runs a short QEMU column (QEMU_RUNS, default 3),
# and exits 0. Both backends use shoji's default configuration (kernel and initramfs from
# $SHOJI_CACHE, default /var/cache/shoji) with only `hypervisor` changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
runs=${RUNS:-10}

cargo build -q --release -p shoji-shim --bin shoji
shoji="${CARGO_TARGET_DIR:-$root/target}/release/shoji"

tmp=$(mktemp -d /tmp/bench-clh.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
printf 'hypervisor = "qemu"\n' >"$tmp/qemu.toml"
printf 'hypervisor = "clh"\n' >"$tmp/clh.toml"
if [ -n "${CLH:-}" ]; then
    printf '[clh]\npath = "%s"\n' "$CLH" >>"$tmp/clh.toml"
fi

echo "== $(date -u +%FT%TZ), $(nproc) cores"
backends=(qemu)
if "$shoji" --config "$tmp/clh.toml" check >"$tmp/clh-check.txt" 2>&1; then
    backends+=(clh)
    grep -E '^(ok|warn) +(accelerator|cloud-hypervisor)' "$tmp/clh-check.txt" || true
else
    echo "Cloud Hypervisor cannot run on this host; \`shoji check\` with hypervisor = \"clh\" says:"
    grep -E '^(warn|MISSING) ' "$tmp/clh-check.txt" | sed 's/^/    /'
    echo "Only the QEMU column is measured (QEMU_RUNS=${QEMU_RUNS:-3} boots). On a KVM node with"
    echo "cloud-hypervisor installed (docs/cloud-hypervisor.md), both columns are measured."
    runs=${QEMU_RUNS:-3}
fi
echo

for b in "${backends[@]}"; do
    echo "-- $b: $runs boots" >&2
    "$shoji" --config "$tmp/$b.toml" vm bench --runs "$runs" --json >"$tmp/$b.jsonl"
done

python3 - "$tmp" "${backends[@]}" <<'EOF'
import json, statistics, sys
tmp, backends = sys.argv[1], sys.argv[2:]
vmm = {"qemu": "qemu-system-x86", "clh": "cloud-hyperviso"}  # /proc comm is cut at 15 chars
rows = [
    ("VMM start → agent ready (ms)", lambda s, b: s["ready_ms"]),
    ("host RSS per sandbox, all processes (MiB)", lambda s, b: sum(k for _, k in s["host_rss_kib"]) / 1024),
    ("host RSS of the VMM (MiB)", lambda s, b: sum(k for n, k in s["host_rss_kib"] if n == vmm[b]) / 1024),
    ("guest used memory (MiB)", lambda s, b: s["guest_used_kib"] / 1024),
]
samples = {b: [json.loads(l) for l in open(f"{tmp}/{b}.jsonl") if l.strip()] for b in backends}
names = {"qemu": "QEMU", "clh": "Cloud Hypervisor"}
print("| figure | " + " | ".join(f"{names[b]} min / median / max" for b in backends) + " |")
print("|---|" + "---|" * len(backends))
for label, f in rows:
    cells = []
    for b in backends:
        v = sorted(f(s, b) for s in samples[b])
        cells.append(f"{v[0]:.1f} / {statistics.median(v):.1f} / {v[-1]:.1f}")
    print(f"| {label} | " + " | ".join(cells) + " |")
procs = {b: sorted({n for s in samples[b] for n, _ in s["host_rss_kib"]}) for b in backends}
print()
for b in backends:
    print(f"{names[b]} sandbox processes: {', '.join(procs[b])}; runs: {len(samples[b])}")
EOF
