#!/usr/bin/env bash
# Inside the testbed VM (called by scripts/bench-targets): every target in turn on the same
# emulated NVMe, ROUNDS interleaved rounds, one table of medians. $1 = seconds per fio
# run, $2 = rounds, $3 = a regex selecting targets (kernel spdk-poll spdk-irq ours-vfio ours-spdk).
set -uo pipefail
SECS=${1:-10} ROUNDS=${2:-2} ONLY=${3:-.}
. "$(dirname "$0")/guest-lib.sh"
BIN=$NVMF_P2P_ROOT/target/release/nvmf-p2p
SPDK=${NVMF_P2P_SPDK:-}
OUT=$NVMF_P2P_SCRATCH/bench-targets; mkdir -p "$OUT"
NQN=nqn.2026-12.io.nvmf-p2p:bench
SOCK=/run/nvmf-p2p/bench.sock
HZ=$(clk_tck)
say() { echo "[bench $(cut -d' ' -f1 /proc/uptime)s] $*"; }
JOBS=("randread-qd32 randread 32" "randwrite-qd32 randwrite 32" "randread-qd1 randread 1")
TARGETS=(kernel spdk-poll spdk-irq ours-vfio ours-spdk)
proc_cpu() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# run_jobs TAG ROUND DEV PID — fio on vCPU0; per job: JSON, guest CPU, target CPU (PID, 0 = none)
run_jobs() {
  local tag=$1 r=$2 dev=$3 pid=$4 j name rw qd b0 t0 f
  # warm-up: TCG translates each code path on its first run
  fio_json "$OUT/warmup.json" "$dev" randread 4k 8 2 --cpus_allowed=0 >/dev/null 2>&1
  for j in "${JOBS[@]}"; do
    set -- $j; name=$1 rw=$2 qd=$3
    f=$OUT/$tag-$name-r$r
    b0=$(cpu_busy); t0=$([ "$pid" != 0 ] && proc_cpu "$pid" || echo 0)
    if fio_json "$f.json" "$dev" "$rw" 4k "$qd" "$SECS" --cpus_allowed=0; then
      echo $(( $(cpu_busy) - b0 )) > "$f.cpu"
      [ "$pid" != 0 ] && echo $(( $(proc_cpu "$pid") - t0 )) > "$f.tcpu"
      say "round $r $tag $name: $(fio_get "$f.json" "${rw#rand}" iops) IOPS"
    else
      say "round $r $tag $name: fio failed: $(tail -3 "$f.json.err")"; rm -f "$f.json"
    fi
  done
}

# wait_sock PID FILE — until FILE exists (serve) or PID dies
wait_up() { local pid=$1 check=$2 i; for i in $(seq 600); do eval "$check" && return 0; kill -0 "$pid" 2>/dev/null || return 1; sleep 0.2; done; return 1; }

ours() { # TAG BACKEND ROUND
  local tag=$1 backend=$2 r=$3 pid dev
  nvme_rebind vfio-pci || return 1
  cat > "$OUT/$tag.toml" <<TOML
control_socket = "$SOCK"
cores = [1]

[[listener]]
trtype = "rdma"
address = "$NVMF_P2P_ADDR"
port = 4420

[[subsystem]]
nqn = "$NQN"
serial = "NVMFP2PBENCH"
allow_any_host = true
[[subsystem.namespace]]
backend = "$backend"
TOML
  "$BIN" serve --config "$OUT/$tag.toml" > "$OUT/$tag-serve.log" 2>&1 &
  pid=$!
  wait_up $pid "[ -S $SOCK ]" || { say "$tag: serve did not come up: $(tail -3 "$OUT/$tag-serve.log")"; kill $pid 2>/dev/null; wait $pid 2>/dev/null; return 1; }
  if dev=$(kconnect "$NQN"); then run_jobs "$tag" "$r" "$dev" $pid; kdisconnect "$NQN"; else say "$tag: nvme connect failed"; fi
  kill -TERM $pid; wait $pid 2>/dev/null
}

spdk_tgt() { # TAG ROUND [--interrupt-mode]
  local tag=$1 r=$2 mode=${3:-} pid dev
  [ -n "$SPDK" ] || { say "$tag: SPDK not built (run scripts/setup)"; return 1; }
  nvme_rebind vfio-pci || return 1
  cat > "$OUT/$tag.json" <<JSON
{"subsystems":[
 {"subsystem":"bdev","config":[{"method":"bdev_nvme_attach_controller","params":{"name":"Nvme0","trtype":"PCIe","traddr":"$NVMF_P2P_BDF"}}]},
 {"subsystem":"nvmf","config":[
  {"method":"nvmf_create_transport","params":{"trtype":"RDMA"}},
  {"method":"nvmf_create_subsystem","params":{"nqn":"$NQN","allow_any_host":true,"serial_number":"SPDKBENCH"}},
  {"method":"nvmf_subsystem_add_ns","params":{"nqn":"$NQN","namespace":{"bdev_name":"Nvme0n1"}}},
  {"method":"nvmf_subsystem_add_listener","params":{"nqn":"$NQN","listen_address":{"trtype":"RDMA","adrfam":"IPv4","traddr":"$NVMF_P2P_ADDR","trsvcid":"4420"}}}
 ]}]}
JSON
  # shellcheck disable=SC2086
  "$SPDK/build/bin/nvmf_tgt" -m 0x2 -s 512 --iova-mode pa $mode -r /var/tmp/bench-spdk.sock \
    --json "$OUT/$tag.json" > "$OUT/$tag-tgt.log" 2>&1 &
  pid=$!
  wait_up $pid "nvme discover -t rdma -a $NVMF_P2P_ADDR -s 4420 >/dev/null 2>&1" ||
    { say "$tag: nvmf_tgt did not come up: $(tail -3 "$OUT/$tag-tgt.log")"; kill $pid 2>/dev/null; wait $pid 2>/dev/null; return 1; }
  if dev=$(kconnect "$NQN"); then run_jobs "$tag" "$r" "$dev" $pid; kdisconnect "$NQN"; else say "$tag: nvme connect failed"; fi
  kill -INT $pid; wait $pid 2>/dev/null
}

kernel() { # ROUND
  local r=$1 bdev rdev
  nvme_rebind nvme || return 1
  bdev=$(nvme_kernel_blockdev) || return 1
  KNQN=$NQN-kernel knvmet_start "$bdev" || return 1
  if rdev=$(kconnect "$NQN-kernel"); then run_jobs kernel "$r" "$rdev" 0; kdisconnect "$NQN-kernel"; fi
  KNQN=$NQN-kernel knvmet_stop
  nvme_rebind vfio-pci
}

say "targets matching '$ONLY', $ROUNDS rounds of ${SECS}s fio runs"
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    [[ "$t" =~ $ONLY ]] || continue
    case $t in
      kernel) kernel "$r" ;;
      spdk-poll) spdk_tgt "$t" "$r" ;;
      spdk-irq) spdk_tgt "$t" "$r" --interrupt-mode ;;
      ours-vfio) ours "$t" "vfio:$NVMF_P2P_BDF" "$r" ;;
      ours-spdk) ours "$t" "spdk:$NVMF_P2P_BDF" "$r" ;;
    esac || say "$t: could not run in round $r"
  done
done

# ---- medians over rounds
med() { sort -n | awk '{a[NR]=$1} END { if (NR == 0) print ""; else if (NR % 2) print a[(NR+1)/2]; else printf "%.0f\n", (a[NR/2] + a[NR/2+1]) / 2 }'; }
metric() { # TAG JOB DIR iops|p50|p99|tcpu|gcpu
  local tag=$1 job=$2 dir=$3 m=$4 f
  for f in "$OUT/$tag-$job"-r*.json; do
    [ -f "$f" ] || continue
    local b=${f%.json} ios; ios=$(fio_get "$f" "$dir" ios)
    case $m in
      iops|p50|p99) fio_get "$f" "$dir" "$m" ;;
      tcpu) [ -f "$b.tcpu" ] && awk -v j="$(cat "$b.tcpu")" -v hz="$HZ" -v n="$ios" 'BEGIN { if (n > 0) printf "%.0f\n", j / hz / n * 1e6 }' ;;
      gcpu) awk -v j="$(cat "$b.cpu")" -v hz="$HZ" -v n="$ios" 'BEGIN { if (n > 0) printf "%.0f\n", j / hz / n * 1e6 }' ;;
    esac
  done | med
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2fx", a / b }'; }
echo
echo "4 KiB, kernel initiator + fio libaio (vCPU0), ${SECS}s per point, median of $ROUNDS interleaved rounds; targets on vCPU1"
printf '| %-14s | %-9s | %7s | %13s | %11s | %11s | %8s | %8s |\n' job target IOPS "p50/p99 us" "tgt CPU us/IO" "guest us/IO" "vs kern" "vs SPDK"
printf '|%s|\n' "----------------|-----------|---------|---------------|---------------|-------------|----------|----------"
for j in "${JOBS[@]}"; do
  set -- $j; name=$1 dir=${2#rand}
  ki=$(metric kernel "$name" "$dir" iops)
  sp=$(metric spdk-poll "$name" "$dir" iops); si=$(metric spdk-irq "$name" "$dir" iops)
  sbest=$(printf '%s\n%s\n' "$sp" "$si" | grep -v '^$' | sort -n | tail -1)
  for t in "${TARGETS[@]}"; do
    i=$(metric "$t" "$name" "$dir" iops)
    [ -n "$i" ] || continue
    printf '| %-14s | %-9s | %7s | %13s | %13s | %11s | %8s | %8s |\n' "$name" "$t" "$i" \
      "$(metric "$t" "$name" "$dir" p50)/$(metric "$t" "$name" "$dir" p99)" \
      "$(metric "$t" "$name" "$dir" tcpu)" "$(metric "$t" "$name" "$dir" gcpu)" \
      "$(ratio "$i" "$ki")" "$(ratio "$i" "$sbest")"
  done
done
echo "tgt CPU = the target process's utime+stime per I/O (kernel nvmet has no process); guest = all vCPUs busy per I/O;"
echo "vs SPDK = against SPDK's better mode (polling or --interrupt-mode) at that point. Raw results: ${OUT#$NVMF_P2P_ROOT/}"
