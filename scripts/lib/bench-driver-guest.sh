#!/usr/bin/env bash
# Inside the testbed (called by scripts/bench-driver): our VFIO driver (`perf --local`,
# with shadow doorbells and with plain MMIO doorbells) vs SPDK's spdk_nvme_perf (its
# userspace driver, same vfio-pci binding) vs fio libaio on the kernel nvme driver, same
# device, same boot. $1 = seconds per run.
set -uo pipefail
SECS=${1:-10}
. "$(dirname "$0")/guest-lib.sh"
BIN=$NVMF_P2P_ROOT/target/release/nvmf-p2p
OUT=$NVMF_P2P_SCRATCH/bench-driver; mkdir -p "$OUT"
declare -A SHADOW MMIO KERN SPDKP
SPDK=${NVMF_P2P_SPDK:-}
nvme_rebind vfio-pci || exit 1
# warm-up (the first seconds after boot run slow), not reported
"$BIN" perf --local "$NVMF_P2P_BDF" -q 32 -t 3 > /dev/null || { echo "perf --local failed"; exit 1; }
for qd in 1 32; do
  "$BIN" perf --local "$NVMF_P2P_BDF" -q $qd -o 4k -w randread -t "$SECS" --json > "$OUT/shadow-$qd.json" || exit 1
  SHADOW[$qd]=$(jq -r '.iops | floor' "$OUT/shadow-$qd.json")
  "$BIN" perf --local "$NVMF_P2P_BDF" -q $qd -o 4k -w randread -t "$SECS" --no-shadow-doorbells --json > "$OUT/mmio-$qd.json" || exit 1
  MMIO[$qd]=$(jq -r '.iops | floor' "$OUT/mmio-$qd.json")
done
# spdk_nvme_perf: exit status 0 even when it attached nothing, so read its Total line
for qd in 1 32; do
  SPDKP[$qd]=""
  [ -x "$SPDK/build/bin/spdk_nvme_perf" ] || { echo "spdk_nvme_perf: SPDK not built (run scripts/setup)"; continue; }
  "$SPDK/build/bin/spdk_nvme_perf" -r "trtype:PCIe traddr:$NVMF_P2P_BDF" -q $qd -o 4096 -w randread \
    -t "$SECS" -s 256 --iova-mode pa > "$OUT/spdk-$qd.txt" 2>&1
  SPDKP[$qd]=$(awk -F: '/^Total/ {split($2, a, " "); printf "%d", a[1]}' "$OUT/spdk-$qd.txt")
  [ -n "${SPDKP[$qd]}" ] || echo "spdk_nvme_perf QD$qd attached nothing: $(tail -3 "$OUT/spdk-$qd.txt")"
done
nvme_rebind nvme || exit 1
dev=$(nvme_kernel_blockdev) || exit 1
for qd in 1 32; do
  fio_json "$OUT/kernel-$qd.json" "$dev" randread 4k $qd "$SECS" || { cat "$OUT/kernel-$qd.json.err"; exit 1; }
  KERN[$qd]=$(fio_get "$OUT/kernel-$qd.json" read iops)
done
nvme_rebind vfio-pci
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
echo
echo "4K randread IOPS, ${SECS}s each, same emulated NVMe, same boot; ratios: ours / spdk_nvme_perf, and / kernel"
printf '%-4s %14s %8s %8s %14s %8s %8s %14s %14s\n' QD "ours shadow-db" "/spdk" "/kernel" "ours mmio-db" "/spdk" "/kernel" "spdk_nvme_perf" "kernel+libaio"
for qd in 1 32; do
  printf '%-4s %14s %8s %8s %14s %8s %8s %14s %14s\n' "$qd" "${SHADOW[$qd]}" "$(ratio "${SHADOW[$qd]}" "${SPDKP[$qd]}")" \
    "$(ratio "${SHADOW[$qd]}" "${KERN[$qd]}")" "${MMIO[$qd]}" "$(ratio "${MMIO[$qd]}" "${SPDKP[$qd]}")" \
    "$(ratio "${MMIO[$qd]}" "${KERN[$qd]}")" "${SPDKP[$qd]:-n/a}" "${KERN[$qd]}"
done
