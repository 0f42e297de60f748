#!/usr/bin/env bash
# Inside the testbed (called by scripts/bench-fio). $1 = seconds per point, $2 = rows
# (comma-separated: nvmf,direct,spdk_nvme,kinit,local,spdk_bdev,kdrv; default all).
set -uo pipefail
. "$(dirname "$0")/guest-lib.sh"
SECS=${1:-10}
ROOT=$NVMF_P2P_ROOT
ENGINE=$ROOT/target/release/libnvmf_p2p_fio.so
BIN=$ROOT/target/release/nvmf-p2p
OUT=$NVMF_P2P_SCRATCH/bench-fio; mkdir -p "$OUT"
NQN=nqn.2026-11.io.nvmf-p2p:bench-fio
DHOST=nqn.2026-11.io.nvmf-p2p:bench-fio-direct
ADDR=$NVMF_P2P_ADDR
SPDK_OK=0; SPDK_WHY="SPDK is not built (run scripts/setup)"
if . "$ROOT/scripts/lib/spdk-env.sh" 2>/dev/null; then
  if [ -n "${SPDK_FIO:-}" ] && [ -f "$SPDK_FIO/spdk_nvme" ] && [ -f "$SPDK_FIO/spdk_bdev" ]; then
    if [ "${NVMF_P2P_HUGEPAGES:-0}" -ge 256 ]; then SPDK_OK=1
    else SPDK_WHY="only ${NVMF_P2P_HUGEPAGES:-0} hugepages in the guest (boot with --mem 3G)"; fi
  else SPDK_WHY="SPDK at $SPDK_PREFIX has no fio plugins (build/fio/spdk_nvme, spdk_bdev)"; fi
fi
SPDK_MEM=256
POINTS=("randread 1" "randread 32" "randwrite 32")
PRELOAD=   # the SPDK plugin fio runs with (LD_PRELOAD, as SPDK's docs run them)

# run NAME RW QD ARGS... — one fio point, JSON to $OUT/NAME-RW-QD.json; prints "IOPS P50 P99"
# (or "- - -" and the reason on stderr)
run() {
  local name=$1 rw=$2 qd=$3; shift 3
  local f=$OUT/$name-$rw-$qd.json d=${rw#rand}
  timeout -k 5 $((SECS * 3 + 90)) env ${PRELOAD:+LD_PRELOAD=$PRELOAD} fio --name="$name" --rw="$rw" --bs=4k --iodepth="$qd" \
      --time_based --ramp_time=1 --runtime="$SECS" --size=48M --output-format=json "$@" \
      > "$f" 2> "$f.err"
  local iops
  iops=$(jq -r ".jobs[0].$d.iops | floor" "$f" 2>/dev/null)
  if [ -z "$iops" ] || [ "$iops" = null ] || [ "$iops" = 0 ]; then
    echo "  ($name $rw QD$qd failed: $(grep -v '^$' "$f.err" | head -2 | tr '\n' ' '))" >&2
    echo "- - -"; return 1
  fi
  echo "$iops $(fio_get "$f" "$d" p50) $(fio_get "$f" "$d" p99)"
}

declare -A R   # R[row/rw-qd] = "IOPS P50 P99"
ROWS=${2:-all}   # rows to run (comma-separated names, or all)
want() { [ "$ROWS" = all ] || [[ ",$ROWS," == *",$1,"* ]]; }
row() { # ROW ARGS... — every point of one row
  local r=$1; shift
  want "$r" || { skip_row "$r" "not in --rows $ROWS"; return; }
  for p in "${POINTS[@]}"; do
    local rw=${p% *} qd=${p#* }
    R[$r/$rw-$qd]=$(run "$r" "$rw" "$qd" "$@")
  done
}
skip_row() { local p; for p in "${POINTS[@]}"; do R[$1/${p% *}-${p#* }]="- - -"; done; echo "  $1: skipped: $2"; }

# ---------------------------------------------------------------- against our target
cat > "$OUT/serve.toml" <<TOML
control_socket = "/run/nvmf-p2p/bench-fio.sock"

[[listener]]
trtype = "rdma"
address = "$ADDR"
port = 4420

[[subsystem]]
nqn = "$NQN"
allow_any_host = true
direct_hosts = ["$DHOST"]
[[subsystem.namespace]]
backend = "vfio:$NVMF_P2P_BDF"
TOML
"$BIN" --log warn serve --config "$OUT/serve.toml" > "$OUT/serve.log" 2>&1 &
SERVE=$!
for _ in $(seq 300); do [ -S /run/nvmf-p2p/bench-fio.sock ] && break; sleep 0.1; done
[ -S /run/nvmf-p2p/bench-fio.sock ] || { echo "serve did not start:"; cat "$OUT/serve.log"; exit 1; }
echo "against nvmf-p2p serve ($NVMF_P2P_BDF through VFIO) at $ADDR:4420, ${SECS} s per point:"
OURS=(--ioengine="external:$ENGINE" --thread=1 --traddr="$ADDR" --subnqn="$NQN")
# TCG translates a code path on its first run: one discarded warm-up per engine
want nvmf && run warm randread 32 "${OURS[@]}" --mode=nvmf > /dev/null 2>&1
row nvmf "${OURS[@]}" --mode=nvmf
row direct "${OURS[@]}" --mode=direct --hostnqn="$DHOST"
if [ $SPDK_OK = 1 ]; then
  SPDK_NVME=(--ioengine=spdk --thread=1 --mem_size_mb=$SPDK_MEM
             "--filename=trtype=RDMA adrfam=IPv4 traddr=$ADDR trsvcid=4420 subnqn=${NQN//:/\\:} ns=1")
  # (fio splits file names at ':' — the NQN's colons are escaped)
  PRELOAD=$SPDK_FIO/spdk_nvme
  want spdk_nvme && run warm randread 32 "${SPDK_NVME[@]}" > /dev/null 2>&1
  row spdk_nvme "${SPDK_NVME[@]}"
  PRELOAD=
else skip_row spdk_nvme "$SPDK_WHY"; fi
if ! want kinit; then skip_row kinit "not in --rows $ROWS"
elif rdev=$(kconnect "$NQN"); then
  run warm randread 32 --ioengine=libaio --direct=1 --filename="$rdev" > /dev/null 2>&1
  row kinit --ioengine=libaio --direct=1 --filename="$rdev"
  kdisconnect "$NQN"
else skip_row kinit "the kernel initiator could not connect"; fi
kill -TERM $SERVE; wait $SERVE 2>/dev/null

# ---------------------------------------------------------------- local
echo "local, the same NVMe:"
row local --ioengine="external:$ENGINE" --thread=1 --mode=local --bdf="$NVMF_P2P_BDF"
if [ $SPDK_OK = 1 ]; then
  cat > "$OUT/bdev.json" <<JSON
{"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_nvme_attach_controller",
  "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "$NVMF_P2P_BDF"}}]}]}
JSON
  PRELOAD=$SPDK_FIO/spdk_bdev
  row spdk_bdev --ioengine=spdk_bdev --thread=1 --filename=Nvme0n1 --spdk_json_conf="$OUT/bdev.json" \
      --spdk_mem=$SPDK_MEM --env_context=--iova-mode=pa
  PRELOAD=
else skip_row spdk_bdev "$SPDK_WHY"; fi
if ! want kdrv; then skip_row kdrv "not in --rows $ROWS"
elif nvme_rebind nvme && kdev=$(nvme_kernel_blockdev); then
  row kdrv --ioengine=libaio --direct=1 --filename="$kdev"
else skip_row kdrv "the kernel nvme driver did not take the device"; fi
nvme_rebind vfio-pci

# ---------------------------------------------------------------- table
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2fx", a / b; else printf "-" }'; }
iops() { echo "${R[$1]:-- - -}" | awk '{print $1}'; }
lat() { echo "${R[$1]:-- - -}" | awk '{print $2 "/" $3}'; }
echo
echo "| 4 KiB | ours nvmf | ours direct | SPDK spdk_nvme | libaio, kernel initiator | nvmf / spdk_nvme (≥1.0x) | nvmf / libaio (≥1.5x) | direct / nvmf (≥1.5x at QD32) |"
echo "|---|---|---|---|---|---|---|---|"
for p in "${POINTS[@]}"; do
  k=${p% *}-${p#* }
  printf '| %s QD%s | %s (%s) | %s (%s) | %s (%s) | %s (%s) | %s | %s | %s |\n' "${p% *}" "${p#* }" \
    "$(iops nvmf/$k)" "$(lat nvmf/$k)" "$(iops direct/$k)" "$(lat direct/$k)" \
    "$(iops spdk_nvme/$k)" "$(lat spdk_nvme/$k)" "$(iops kinit/$k)" "$(lat kinit/$k)" \
    "$(ratio "$(iops nvmf/$k)" "$(iops spdk_nvme/$k)")" "$(ratio "$(iops nvmf/$k)" "$(iops kinit/$k)")" \
    "$(ratio "$(iops direct/$k)" "$(iops nvmf/$k)")"
done
echo
echo "| 4 KiB, local | ours local | SPDK spdk_bdev | libaio, kernel nvme | local / spdk_bdev (≥1.0x) | local / libaio |"
echo "|---|---|---|---|---|---|"
for p in "${POINTS[@]}"; do
  k=${p% *}-${p#* }
  printf '| %s QD%s | %s (%s) | %s (%s) | %s (%s) | %s | %s |\n' "${p% *}" "${p#* }" \
    "$(iops local/$k)" "$(lat local/$k)" "$(iops spdk_bdev/$k)" "$(lat spdk_bdev/$k)" \
    "$(iops kdrv/$k)" "$(lat kdrv/$k)" \
    "$(ratio "$(iops local/$k)" "$(iops spdk_bdev/$k)")" "$(ratio "$(iops local/$k)" "$(iops kdrv/$k)")"
done
echo "(IOPS, in parentheses p50/p99 completion latency in µs; JSON per point in $OUT)"
