#!/usr/bin/env bash
# Inside the testbed VM (called by scripts/bench): the benchmark matrix of one boot.
#   $1 = preset (full | quick | smoke | demo | direct | driver | targets | fio; docs/bench.md), $2 = seconds per point, $3 = rounds,
#   $4 = a regex over point names TARGET/INITIATOR/WORKLOAD (. = all), $5 = the directory of
#   the release binaries (default $NVMF_P2P_ROOT/target/release)
# Writes $NVMF_P2P_SCRATCH/bench/points.jsonl (one JSON record per measured point, failed
# ones with ok=false and the reason) and meta.json (the guest's versions), and prints
#   @@bench:scratch DIR            once, first
#   @@bench:plan N                 the number of points to measure
#   @@bench:point K N PHASE NAME R before each point (the host turns it into a progress line)
# With BENCH_PLAN_ONLY set it prints the plan of one round and stops (scripts/bench --plan).
# Rounds are interleaved: round 1 of every target, then round 2, ... so host-load drift
# hits every target alike. Targets serve from vCPU1, initiators run on vCPU0.
set -uo pipefail
PRESET=${1:-quick} SECS=${2:-5} ROUNDS=${3:-3} ONLY=${4:-.}
BENCH_BIN_DIR=${5:-$NVMF_P2P_ROOT/target/release}
# shellcheck source=guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
OUT=$NVMF_P2P_SCRATCH/bench; mkdir -p "$OUT"
POINTS=$OUT/points.jsonl; : > "$POINTS"
export PERFTEST_LOGS=$OUT
# shellcheck source=bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
echo "@@bench:scratch $OUT"

# ---------------------------------------------------------------- the matrix
# workload name -> "rw bs qd"
declare -A WL=(
  [randread-4k-qd1]="randread 4096 1"    [randread-4k-qd32]="randread 4096 32"
  [randwrite-4k-qd1]="randwrite 4096 1"  [randwrite-4k-qd32]="randwrite 4096 32"
  [read-128k-qd8]="read 131072 8"        [write-128k-qd8]="write 131072 8"
  [randrw70-4k-qd16]="randrw 4096 16"
)
ALL_WL="randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 read-128k-qd8 write-128k-qd8 randrw70-4k-qd16"
CORE_WL="randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd32"
# sessions: "TARGET INITIATOR,INITIATOR:core,..." — one target up, its initiators in turn;
# INITIATOR:core runs only the core workloads ($CORE_WL), the others every workload. The
# targets on the kernel nvme driver come first, so a round rebinds the device once.
case $PRESET in
  full)
    WORKLOADS=$ALL_WL
    SESSIONS=("local-kernel fio-libaio" "kernel fio-libaio,perf:core,fio-engine:core,spdk_nvme_perf:core"
              "spdk fio-libaio,perf:core,fio-engine:core,spdk_nvme_perf:core" "spdk-irq fio-libaio:core"
              "ours-vfio fio-libaio,perf:core,fio-engine:core,spdk_nvme_perf:core,fio-spdk:core" "ours-spdk fio-libaio,perf:core"
              "ours-direct-pushed perf,fio-engine:core" "ours-direct-polled perf,fio-engine:core"
              "ours-spdk-direct-pushed perf:core" "ours-spdk-direct-polled perf:core"
              "local-ours perf,fio-engine:core" "local-spdk spdk_nvme_perf,fio-spdk:core")
    RXE=("ib_write_bw 4096 2000" "ib_write_bw 131072 250" "ib_write_lat 4096 500") ;;
  quick)
    WORKLOADS=$CORE_WL
    SESSIONS=("local-kernel fio-libaio" "kernel fio-libaio,perf" "spdk fio-libaio" "ours-vfio fio-libaio,perf"
              "ours-direct-pushed perf" "local-ours perf")
    RXE=("ib_write_bw 4096 1000" "ib_write_lat 4096 300") ;;
  smoke)
    WORKLOADS="randread-4k-qd32"
    SESSIONS=("kernel fio-libaio" "ours-vfio perf")
    RXE=() ;;
  # the presets of the older per-script benches (scripts/demo, bench-direct, bench-driver,
  # bench-targets are wrappers of scripts/bench --preset NAME)
  demo)
    WORKLOADS=$CORE_WL
    SESSIONS=("kernel fio-libaio" "ours-vfio fio-libaio")
    RXE=() ;;
  direct)
    WORKLOADS=$CORE_WL
    SESSIONS=("kernel fio-libaio" "ours-vfio perf" "ours-direct-pushed perf" "ours-direct-polled perf"
              "ours-spdk perf" "ours-spdk-direct-pushed perf")
    RXE=() ;;
  fio)
    WORKLOADS=$CORE_WL
    SESSIONS=("local-kernel fio-libaio" "kernel fio-libaio" "ours-vfio fio-engine,fio-spdk,fio-libaio"
              "ours-direct-pushed fio-engine" "local-ours fio-engine" "local-spdk fio-spdk")
    RXE=() ;;
  driver)
    WORKLOADS=$CORE_WL
    SESSIONS=("local-kernel fio-libaio" "local-ours perf" "local-spdk spdk_nvme_perf")
    RXE=() ;;
  targets)
    WORKLOADS=$CORE_WL
    SESSIONS=("kernel fio-libaio" "spdk fio-libaio" "spdk-irq fio-libaio" "ours-vfio fio-libaio" "ours-spdk fio-libaio")
    RXE=() ;;
  *) echo "bench-guest: unknown preset $PRESET" >&2; exit 2 ;;
esac
# the plan: every selected point of one round, "TARGET INIT WORKLOAD" (rxe: "rxe TOOL BS ITERS")
PLAN=()
for s in "${SESSIONS[@]}"; do
  t=${s%% *}
  IFS=, read -ra inits <<< "${s#* }"
  for i in "${inits[@]}"; do
    wls=$WORKLOADS
    case $i in *:core) i=${i%:core}; wls=$(for w in $WORKLOADS; do [[ " $CORE_WL " == *" $w "* ]] && echo "$w"; done) ;; esac
    for w in $wls; do
      # a direct queue's commands carry at most 8 KiB (two PRPs, docs/direct-mode.md):
      # the 128 KiB workloads do not apply to direct targets
      read -r _ bs _ <<< "${WL[$w]}"
      [[ $t == *direct-* && $bs -gt 8192 ]] && continue
      [[ "$t/$i/$w" =~ $ONLY ]] && PLAN+=("$t $i $w")
    done
  done
done
for x in "${RXE[@]}"; do
  read -r tool bs iters <<< "$x"
  [[ "rxe/$tool/${tool#ib_}-$((bs / 1024))k" =~ $ONLY ]] && PLAN+=("rxe $tool $bs $iters")
done
N=$(( ${#PLAN[@]} * ROUNDS ))
echo "@@bench:plan $N"
[ "$N" -gt 0 ] || { echo "bench-guest: no point matches '$ONLY' in preset $PRESET" >&2; exit 2; }
# scripts/bench --plan: the points of one round, nothing run (works on the host)
if [ -n "${BENCH_PLAN_ONLY:-}" ]; then printf '%s\n' "${PLAN[@]}"; exit 0; fi

# the guest's side of the metadata
jq -n --arg k "$(uname -r)" --arg fio "$(fio --version 2>/dev/null)" \
  --arg spdk "$(basename "${SPDK:-none}")" --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
  --argjson ncpu "$(nproc)" --arg mem "$(awk '/^MemTotal:/ {print $2 " kB"}' /proc/meminfo)" \
  '{guest_kernel: $k, fio: $fio, spdk: $spdk, guest_cpu: $cpu, guest_vcpus: $ncpu, guest_mem: $mem}' > "$OUT/meta.json"

# ---------------------------------------------------------------- run
# The rounds run as one sequence, every other round in reverse order ("serpentine"): each
# round still visits every point, and the target that ends a round begins the next, so it
# stays up (and the kernel initiator connected) across the boundary.
SEQ=()
for r in $(seq "$ROUNDS"); do
  if ((r % 2)); then for p in "${PLAN[@]}"; do SEQ+=("$r $p"); done
  else for ((j = ${#PLAN[@]} - 1; j >= 0; j--)); do SEQ+=("$r ${PLAN[j]}"); done; fi
done
fast_copies /run/nvmf-p2p-bench || bsay "could not copy the tools into guest memory: they run from the 9p root"
K=0 cur=
declare -A WARM   # TARGET/INIT -> 1 once warmed up (TCG translates a code path on its first run)
for p in "${SEQ[@]}" "0 END"; do
  read -r r t i w x <<< "$p"
  # a new target: the previous session's records written (one jq), the previous target
  # down, this one up (failures become records)
  if [ "$t" != "$cur" ]; then
    flush_points
    if [ -n "$cur" ] && [ "$cur" != rxe ]; then target_down "$cur"; fi
    cur=$t UP=1
    [ "$t" = END ] && break
    if [ "$t" != rxe ] && ! target_up "$t" 2> "$OUT/$t-up.err"; then
      UP=0; bsay "$t: could not start: $(tail -2 "$OUT/$t-up.err" | tr '\n' ' ')"
    fi
  fi
  K=$((K + 1))
  if [ "$t" = rxe ]; then
    echo "@@bench:point $K $N rxe rxe/$i/${i#ib_}-$((w / 1024))k $r"
    rxe_measure "$i" "$w" "$x" "$r"
    continue
  fi
  read -r rw bs qd <<< "${WL[$w]}"
  phase=fabric; [[ $t == local-* ]] && phase=local
  echo "@@bench:point $K $N $phase $t/$i/$w $r"
  if [ "$UP" = 0 ]; then
    emit_failed "$t" "$i" "$w" "$rw" "$bs" "$qd" "$r" "$SECS" "target did not start: $(tail -1 "$OUT/$t-up.err")"
    continue
  fi
  if [ -z "${WARM[$t/$i]:-}" ]; then
    init_run "$i" randread 4096 8 1 "$OUT/warmup" > /dev/null 2>&1; WARM[$t/$i]=1
  fi
  measure "$t" "$i" "$w" "$rw" "$bs" "$qd" "$r" "$SECS"
done
perf_stop
nvme_rebind vfio-pci
echo "@@bench:done $(grep -c '"ok":true' "$POINTS") of $N points measured"
