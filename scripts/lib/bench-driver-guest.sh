#!/usr/bin/env bash
# Inside the testbed (called by scripts/bench-driver): our VFIO driver (`perf --local`)
# vs fio libaio on the kernel nvme driver, same device, same boot. $1 = seconds per run.
set -uo pipefail
SECS=${1:-10}
. "$(dirname "$0")/guest-lib.sh"
BIN=$NVMF_P2P_ROOT/target/release/nvmf-p2p
OUT=$NVMF_P2P_SCRATCH/bench-driver; mkdir -p "$OUT"
declare -A OURS KERN
for qd in 1 32; do
  nvme_rebind vfio-pci || exit 1
  "$BIN" perf --local "$NVMF_P2P_BDF" -q $qd -o 4k -w randread -t "$SECS" --json > "$OUT/ours-$qd.json" ||
    { echo "perf --local failed"; exit 1; }
  OURS[$qd]=$(jq -r '.iops | floor' "$OUT/ours-$qd.json")
done
nvme_rebind nvme || exit 1
dev=$(nvme_kernel_blockdev) || exit 1
for qd in 1 32; do
  fio_json "$OUT/kernel-$qd.json" "$dev" randread 4k $qd "$SECS" || { cat "$OUT/kernel-$qd.json.err"; exit 1; }
  KERN[$qd]=$(fio_get "$OUT/kernel-$qd.json" read iops)
done
nvme_rebind vfio-pci
echo
echo "4K randread, ${SECS}s each, same emulated NVMe, same boot"
printf '%-6s %14s %14s %8s\n' QD "ours (VFIO)" "kernel+libaio" ratio
for qd in 1 32; do
  printf '%-6s %14s %14s %8s\n' "$qd" "${OURS[$qd]}" "${KERN[$qd]}" \
    "$(awk -v a="${OURS[$qd]}" -v b="${KERN[$qd]}" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }')"
done
echo "(reference on this testbed: SPDK's spdk_nvme_perf reaches 5.8x at QD32, 2.6x at QD1)"
