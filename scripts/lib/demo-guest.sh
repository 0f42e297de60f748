#!/usr/bin/env bash
# Inside the testbed VM (called by scripts/demo): fio through the kernel initiator against
# our target, then against the kernel nvmet-rdma target, both on the same emulated NVMe;
# prints one table. $1 = seconds per fio run.
set -uo pipefail
SECS=${1:-20}
. "$(dirname "$0")/guest-lib.sh"
BIN=$NVMF_P2P_ROOT/target/release/nvmf-p2p
OUT=$NVMF_P2P_SCRATCH/demo; mkdir -p "$OUT"
NQN=nqn.2026-11.io.nvmf-p2p:demo
SOCK=/run/nvmf-p2p/demo.sock   # guest-local: 9p (the shared tree) cannot hold sockets
HZ=$(clk_tck)
say() { echo "[demo $(cut -d' ' -f1 /proc/uptime)s] $*"; }

# the three fio runs: name rw qd extra-args
JOBS=("randread-qd32 randread 32" "randwrite-qd32 randwrite 32 --verify=crc32c --verify_backlog=512 --verify_fatal=1" "randread-qd1 randread 1")

# run_jobs TAG DEV — every job against DEV; results in $OUT/TAG-<job>.{json,cpu}
run_jobs() {
  local tag=$1 dev=$2 j name rw qd b0 b1
  for j in "${JOBS[@]}"; do
    set -- $j; name=$1 rw=$2 qd=$3; shift 3
    b0=$(cpu_busy)
    if fio_json "$OUT/$tag-$name.json" "$dev" "$rw" 4k "$qd" "$SECS" "$@"; then
      b1=$(cpu_busy)
      echo $((b1 - b0)) > "$OUT/$tag-$name.cpu"
      say "$tag $name: $(fio_get "$OUT/$tag-$name.json" "${rw#rand}" iops) IOPS"
    else
      say "$tag $name: fio failed: $(tail -3 "$OUT/$tag-$name.json.err")"
      rm -f "$OUT/$tag-$name.json"
    fi
  done
}

# ---- ours: nvmf-p2p serve on the NVMe through VFIO
ours() {
  nvme_rebind vfio-pci || return 1
  cat > "$OUT/target.toml" <<TOML
control_socket = "$SOCK"

[[listener]]
trtype = "rdma"
address = "$NVMF_P2P_ADDR"
port = 4420

[[subsystem]]
nqn = "$NQN"
serial = "NVMFP2PDEMO"
allow_any_host = true
[[subsystem.namespace]]
backend = "vfio:$NVMF_P2P_BDF"
TOML
  "$BIN" serve --config "$OUT/target.toml" > "$OUT/serve.log" 2>&1 &
  local pid=$! dev
  for _ in $(seq 600); do [ -S "$SOCK" ] && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  if ! kill -0 $pid 2>/dev/null; then say "nvmf-p2p serve exited: $(tail -3 "$OUT/serve.log")"; return 1; fi
  local t0; t0=$(awk '{print $14+$15}' /proc/$pid/stat)
  if dev=$(kconnect "$NQN"); then
    say "ours: kernel initiator sees $dev"
    run_jobs ours "$dev"
    kdisconnect "$NQN"
  else
    say "ours: nvme connect failed"
  fi
  echo $(( $(awk '{print $14+$15}' /proc/$pid/stat) - t0 )) > "$OUT/ours-target.cpu"
  kill -TERM $pid; wait $pid
  say "ours: serve exited with status $?"
}

# ---- kernel nvmet-rdma on the same NVMe through the kernel nvme driver
kernel() {
  nvme_rebind nvme || return 1
  local bdev rdev
  bdev=$(nvme_kernel_blockdev) || return 1
  KNQN=$NQN-kernel knvmet_start "$bdev" || return 1
  if rdev=$(kconnect "$NQN-kernel"); then
    say "kernel: $bdev exported, kernel initiator sees $rdev"
    run_jobs kernel "$rdev"
    kdisconnect "$NQN-kernel"
  fi
  KNQN=$NQN-kernel knvmet_stop
  nvme_rebind vfio-pci
}

ours || say "our target could not run"
kernel || say "the kernel target could not run"

# ---- the table
val() { [ -f "$OUT/$1-$2.json" ] && fio_get "$OUT/$1-$2.json" "$3" "$4" || echo; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2fx", a / b }'; }
cpu_per_io() { # TAG JOB DIR -> microseconds of guest CPU per I/O
  local ios; ios=$(val "$1" "$2" "$3" ios)
  [ -n "$ios" ] && [ "$ios" != 0 ] && [ -f "$OUT/$1-$2.cpu" ] &&
    awk -v j="$(cat "$OUT/$1-$2.cpu")" -v hz="$HZ" -v n="$ios" 'BEGIN { printf "%.1f", j / hz / n * 1e6 }'
}
echo
echo "4 KiB fio (libaio, kernel initiator), ${SECS}s each; our target: nvmf-p2p serve (VFIO backend); kernel: nvmet-rdma"
printf '%-16s | %10s %10s %7s | %15s %15s | %11s %11s %7s\n' job "ours IOPS" "kern IOPS" ratio \
  "ours p50/p99us" "kern p50/p99us" "ours CPUus" "kern CPUus" ratio
printf '%s\n' "-----------------+-------------------------------+---------------------------------+---------------------------------"
FAILED=0
for j in "${JOBS[@]}"; do
  set -- $j; name=$1 dir=${2#rand}
  oi=$(val ours "$name" "$dir" iops) ki=$(val kernel "$name" "$dir" iops)
  oc=$(cpu_per_io ours "$name" "$dir") kc=$(cpu_per_io kernel "$name" "$dir")
  [ -n "$oi" ] && [ -n "$ki" ] || FAILED=1
  printf '%-16s | %10s %10s %7s | %15s %15s | %11s %11s %7s\n' "$name" "${oi:-n/a}" "${ki:-n/a}" "$(ratio "$oi" "$ki")" \
    "$(val ours "$name" "$dir" p50)/$(val ours "$name" "$dir" p99)" \
    "$(val kernel "$name" "$dir" p50)/$(val kernel "$name" "$dir" p99)" \
    "${oc:-n/a}" "${kc:-n/a}" "$(ratio "$kc" "$oc")"
done
echo "CPU us = guest CPU busy time (all vCPUs, /proc/stat) per I/O; its ratio is kernel/ours (>1x: we spend less)."
[ -f "$OUT/ours-target.cpu" ] && echo "our target process: $(awk -v j="$(cat "$OUT/ours-target.cpu")" -v hz="$HZ" 'BEGIN{printf "%.2f", j/hz}') CPU-seconds over all runs"
echo "raw results: ${OUT#$NVMF_P2P_ROOT/}"
exit $FAILED
