#!/usr/bin/env bash
# Inside the testbed (called by scripts/bench-direct). $1 = the vm_direct test binary.
set -uo pipefail
. "$(dirname "$0")/guest-lib.sh"
OUT=$NVMF_P2P_SCRATCH/bench-direct; mkdir -p "$OUT"
NVMF_P2P_FIGURES=1 "$1" --test-threads=1 --nocapture > "$OUT/direct.log" 2>&1 ||
  { tail -30 "$OUT/direct.log"; echo "vm_direct failed"; exit 1; }
echo "ours (our initiator; target CPU = the serve process's CPU time per I/O):"
grep '^FIGURE' "$OUT/direct.log" | sed 's/^FIGURE /  /'
nvme_rebind nvme || exit 1
bdev=$(nvme_kernel_blockdev) || exit 1
KNQN=nqn.2026-11.io.nvmf-p2p:bench-direct-kernel
knvmet_start "$bdev" || exit 1
rdev=$(kconnect "$KNQN") || { knvmet_stop; exit 1; }
# Fairness: under TCG a code path's first run also pays for translating it, and our figure
# runs above are warm (interleaved repeats). Warm the kernel target's path up the same way
# (discarded run), and show that nothing of ours is still running.
fio_json "$OUT/k-warmup.json" "$rdev" randread 4k 32 2 > /dev/null 2>&1 || true
echo "busiest guest processes before the kernel runs:"
top -b -n1 -o %CPU | sed -n '8,11p' | sed 's/^/  /'
echo "kernel nvmet-rdma (kernel initiator, fio libaio; guest CPU per I/O):"
for j in "randread 1" "randread 32" "randwrite 1" "randwrite 32"; do
  set -- $j
  b0=$(cpu_busy)
  fio_json "$OUT/k-$1-$2.json" "$rdev" "$1" 4k "$2" 3 || continue
  b1=$(cpu_busy)
  d=${1#rand}
  printf '  kernel   %-9s QD%-2s: %6s IOPS p50 %6s us p99 %7s us, guest CPU %6s us/IO\n' "$1" "$2" \
    "$(fio_get "$OUT/k-$1-$2.json" "$d" iops)" "$(fio_get "$OUT/k-$1-$2.json" "$d" p50)" \
    "$(fio_get "$OUT/k-$1-$2.json" "$d" p99)" \
    "$(awk -v j=$((b1 - b0)) -v hz="$(clk_tck)" -v n="$(fio_get "$OUT/k-$1-$2.json" "$d" ios)" 'BEGIN { printf "%.1f", j / hz / n * 1e6 }')"
done
kdisconnect "$KNQN"
# Our initiator against the same kernel target: `perf` next to fio + the kernel initiator
# (issue 11 item 6: the userspace initiator measured on its own, no target of ours).
BIN=$NVMF_P2P_ROOT/target/release/nvmf-p2p
echo "our perf initiator against kernel nvmet-rdma (guest CPU per I/O):"
for j in "randread 1" "randread 32" "randwrite 1" "randwrite 32"; do
  set -- $j
  b0=$(cpu_busy)
  "$BIN" perf --traddr "$NVMF_P2P_ADDR" --subnqn "$KNQN" -w "$1" -o 4k -q "$2" -t 3 --json \
    > "$OUT/p-$1-$2.json" 2> "$OUT/p-$1-$2.err" || { echo "  perf $1 QD$2 failed: $(tail -1 "$OUT/p-$1-$2.err")"; continue; }
  b1=$(cpu_busy)
  printf '  perf     %-9s QD%-2s: %6s IOPS p50 %6s us p99 %7s us, guest CPU %6s us/IO\n' "$1" "$2" \
    "$(jq -r '.iops | floor' "$OUT/p-$1-$2.json")" "$(jq -r '.lat_us.p50 | floor' "$OUT/p-$1-$2.json")" \
    "$(jq -r '.lat_us.p99 | floor' "$OUT/p-$1-$2.json")" \
    "$(awk -v j=$((b1 - b0)) -v hz="$(clk_tck)" -v n="$(jq -r .ios "$OUT/p-$1-$2.json")" 'BEGIN { printf "%.1f", j / hz / n * 1e6 }')"
done
knvmet_stop
nvme_rebind vfio-pci
