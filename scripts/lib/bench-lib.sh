# shellcheck shell=bash
# Phases of scripts/bench inside the testbed VM (sourced by bench-guest.sh, after
# guest-lib.sh): bring a target up on the emulated NVMe and down again, run one
# initiator at one point, and append one JSON record per measured point to $POINTS.
# The record's fields are documented in docs/bench.md ("points.jsonl").
#
# The only copy of the bench targets' set-up: scripts/demo, bench-targets, bench-direct and
# bench-driver are presets of scripts/bench (their own guest scripts are gone). The fio
# engine options come from bench-fio-guest.sh, the perftest pair from bench-rdma, the nvmet
# helpers from guest-lib.sh.

BIN=${BENCH_BIN_DIR:-$NVMF_P2P_ROOT/target/release}/nvmf-p2p
ENGINE=${BENCH_BIN_DIR:-$NVMF_P2P_ROOT/target/release}/libnvmf_p2p_fio.so
SPDK=${NVMF_P2P_SPDK:-}
BNQN=nqn.2026-12.io.nvmf-p2p:bench
DHOST=nqn.2014-08.org.nvmexpress:uuid:6e766d66-7032-7000-8000-0000000000d5
BSOCK=/run/nvmf-p2p/bench.sock   # guest-local: 9p (the shared tree) cannot hold sockets
HZ=$(clk_tck)
proc_cpu() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
bsay() { echo "[bench $(cut -d' ' -f1 /proc/uptime)s] $*" >&2; }

# wait_up PID CHECK — until CHECK succeeds (0) or PID dies (1), at most 120 s
wait_up() { local pid=$1 check=$2; for _ in $(seq 600); do eval "$check" && return 0; kill -0 "$pid" 2>/dev/null || return 1; sleep 0.2; done; return 1; }

# ---------------------------------------------------------------- targets
# target_up NAME — start target NAME; sets T_PID (0 = no process: kernel, local), T_NQN,
# T_KIND (fabric | local), T_DEV (block device for fio libaio, local-kernel only),
# T_COMPLETIONS (direct targets). Returns non-zero with a reason on stderr.
T_PID=0 T_NQN='' T_KIND='' T_DEV='' T_COMPLETIONS='' T_KDEV=''
target_up() {
  local name=$1 backend
  T_PID=0 T_NQN=$BNQN T_KIND=fabric T_DEV='' T_COMPLETIONS='' T_KDEV=''
  case $name in
    kernel)
      nvme_rebind nvme || return 1
      local bdev; bdev=$(nvme_kernel_blockdev) || return 1
      T_NQN=$BNQN-kernel
      KNQN=$T_NQN knvmet_start "$bdev" || return 1 ;;
    spdk|spdk-irq)
      [ -x "$SPDK/build/bin/nvmf_tgt" ] || { echo "SPDK is not built (run scripts/setup)" >&2; return 1; }
      nvme_rebind vfio-pci || return 1
      cat > "$OUT/$name.json" <<JSON
{"subsystems":[
 {"subsystem":"bdev","config":[{"method":"bdev_nvme_attach_controller","params":{"name":"Nvme0","trtype":"PCIe","traddr":"$NVMF_P2P_BDF"}}]},
 {"subsystem":"nvmf","config":[
  {"method":"nvmf_create_transport","params":{"trtype":"RDMA"}},
  {"method":"nvmf_create_subsystem","params":{"nqn":"$BNQN","allow_any_host":true,"serial_number":"SPDKBENCH"}},
  {"method":"nvmf_subsystem_add_ns","params":{"nqn":"$BNQN","namespace":{"bdev_name":"Nvme0n1"}}},
  {"method":"nvmf_subsystem_add_listener","params":{"nqn":"$BNQN","listen_address":{"trtype":"RDMA","adrfam":"IPv4","traddr":"$NVMF_P2P_ADDR","trsvcid":"4420"}}}
 ]}]}
JSON
      local mode=; [ "$name" = spdk-irq ] && mode=--interrupt-mode
      # shellcheck disable=SC2086
      "$SPDK/build/bin/nvmf_tgt" -m 0x2 -s 512 --iova-mode pa $mode -r /var/tmp/bench-spdk.sock \
        --json "$OUT/$name.json" > "$OUT/$name-tgt.log" 2>&1 &
      T_PID=$!
      wait_up $T_PID "nvme discover -t rdma -a $NVMF_P2P_ADDR -s 4420 >/dev/null 2>&1" ||
        { echo "nvmf_tgt did not come up: $(tail -3 "$OUT/$name-tgt.log")" >&2; target_down "$name"; return 1; } ;;
    ours-vfio|ours-spdk|ours-direct-pushed|ours-direct-polled|ours-spdk-direct-pushed|ours-spdk-direct-polled)
      nvme_rebind vfio-pci || return 1
      backend=vfio:$NVMF_P2P_BDF; [[ $name == ours-spdk* ]] && backend=spdk:$NVMF_P2P_BDF
      local direct=
      case $name in *direct-*) direct="direct_hosts = [\"$DHOST\"]"; T_COMPLETIONS=${name##*direct-} ;; esac
      cat > "$OUT/$name.toml" <<TOML
control_socket = "$BSOCK"
cores = [1]

[[listener]]
trtype = "rdma"
address = "$NVMF_P2P_ADDR"
port = 4420

[[subsystem]]
nqn = "$BNQN"
serial = "NVMFP2PBENCH"
allow_any_host = true
$direct
[[subsystem.namespace]]
backend = "$backend"
TOML
      "$BIN" --log warn serve --config "$OUT/$name.toml" > "$OUT/$name-serve.log" 2>&1 &
      T_PID=$!
      local up="[ -S $BSOCK ]"
      [ -n "$T_COMPLETIONS" ] && up="grep -q 'direct mode on' $OUT/$name-serve.log"
      wait_up $T_PID "$up" ||
        { echo "serve did not come up: $(tail -3 "$OUT/$name-serve.log")" >&2; target_down "$name"; return 1; } ;;
    local-ours|local-spdk)
      T_KIND=local
      nvme_rebind vfio-pci || return 1 ;;
    local-kernel)
      T_KIND=local
      nvme_rebind nvme || return 1
      T_DEV=$(nvme_kernel_blockdev) || return 1 ;;
    *) echo "unknown target $name" >&2; return 1 ;;
  esac
}

# target_down NAME — the kernel initiator's connection (if any), then the target
target_down() {
  local name=$1
  if [ -n "$T_KDEV" ]; then kdisconnect "$T_NQN" 2>/dev/null; T_KDEV=; fi
  case $name in
    kernel) KNQN=$T_NQN knvmet_stop ;;
    spdk|spdk-irq) [ "$T_PID" != 0 ] && { kill -INT "$T_PID" 2>/dev/null; wait "$T_PID" 2>/dev/null; } ;;
    ours-*) [ "$T_PID" != 0 ] && { kill -TERM "$T_PID" 2>/dev/null; wait "$T_PID" 2>/dev/null; } ;;
  esac
  T_PID=0
  nvme_rebind vfio-pci
}

# ---------------------------------------------------------------- initiators
# init_run INIT RW BS QD SECS OUT — one run of initiator INIT against the target that is
# up; writes OUT.norm, a JSON object {iops, mib_s, ios, p50, p99, p99_9, rdma_ops_per_io}
# (null where the tool does not say). RW is a fio rw name; randrw reads 70 %.
init_run() {
  local init=$1 rw=$2 bs=$3 qd=$4 secs=$5 out=$6 mix=()
  rm -f "$out".*
  case $init in
    fio-libaio)
      local dev=$T_DEV
      if [ "$T_KIND" = fabric ]; then
        if [ -z "$T_KDEV" ]; then T_KDEV=$(kconnect "$T_NQN") || { T_KDEV=; echo "nvme connect failed" > "$out.err"; return 1; }; fi
        dev=$T_KDEV
      fi
      [ "$rw" = randrw ] && mix=(--rwmixread=70)
      fio_json "$out.json" "$dev" "$rw" "$bs" "$qd" "$secs" --cpus_allowed=0 "${mix[@]}" 2>/dev/null ||
        { mv -f "$out.json.err" "$out.err" 2>/dev/null; return 1; }
      norm_fio "$out.json" > "$out.norm" 2>> "$out.err" ;;
    fio-engine)
      local eng=(--ioengine="external:$ENGINE" --thread=1)
      case $T_KIND/$T_COMPLETIONS in
        local/*) eng+=(--mode=local --bdf="$NVMF_P2P_BDF") ;;
        fabric/) eng+=(--mode=nvmf --traddr="$NVMF_P2P_ADDR" --subnqn="$T_NQN") ;;
        fabric/*) eng+=(--mode=direct --traddr="$NVMF_P2P_ADDR" --subnqn="$T_NQN" --hostnqn="$DHOST" --completions="$T_COMPLETIONS") ;;
      esac
      [ "$rw" = randrw ] && mix=(--rwmixread=70)
      fio --name=job --rw="$rw" --bs="$bs" --iodepth="$qd" --time_based --runtime="$secs" --size=48M \
          --cpus_allowed=0 --output-format=json "${eng[@]}" "${mix[@]}" > "$out.json" 2> "$out.err" || return 1
      norm_fio "$out.json" > "$out.norm" 2>> "$out.err" ;;
    perf)
      local args=(-w "$rw" -o "$bs" -q "$qd" -t "$secs" --json)
      [ "$rw" = randrw ] && args+=(-M 70)
      if [ "$T_KIND" = local ]; then args+=(--local "$NVMF_P2P_BDF")
      else args+=(--traddr "$NVMF_P2P_ADDR" --subnqn "$T_NQN")
        [ -n "$T_COMPLETIONS" ] && args+=(--direct --hostnqn "$DHOST" --completions "$T_COMPLETIONS")
      fi
      taskset -c 0 "$BIN" perf "${args[@]}" > "$out.json" 2> "$out.err" || return 1
      norm_perf "$out.json" > "$out.norm" 2>> "$out.err" ;;
    spdk_nvme_perf)
      [ -x "$SPDK/build/bin/spdk_nvme_perf" ] || { echo "SPDK is not built (run scripts/setup)" > "$out.err"; return 1; }
      local trid="trtype:PCIe traddr:$NVMF_P2P_BDF"
      [ "$T_KIND" = fabric ] && trid="trtype:RDMA adrfam:IPv4 traddr:$NVMF_P2P_ADDR trsvcid:4420 subnqn:$T_NQN"
      [ "$rw" = randrw ] && mix=(-M 70)
      # exit status 0 even when it attached nothing: norm_spdk_perf fails without a Total line
      "$SPDK/build/bin/spdk_nvme_perf" -r "$trid" -q "$qd" -o "$bs" -w "$rw" "${mix[@]}" -t "$secs" \
        -c 0x1 -s 256 --iova-mode pa -L > "$out.txt" 2> "$out.err" || return 1
      norm_spdk_perf "$out.txt" "$secs" > "$out.norm" || { tail -3 "$out.txt" >> "$out.err"; rm -f "$out.norm"; return 1; } ;;
    *) echo "unknown initiator $init" > "$out.err"; return 1 ;;
  esac
}

# norm_fio FILE — reads and writes summed; percentiles of reads (of writes for write-only)
norm_fio() {
  jq -c '.jobs[0] as $j | ($j.read.total_ios + $j.write.total_ios) as $n
    | (if $j.read.total_ios > 0 then $j.read else $j.write end).clat_ns.percentile as $p
    | {iops: ($j.read.iops + $j.write.iops), mib_s: (($j.read.bw_bytes + $j.write.bw_bytes) / 1048576),
       ios: $n, p50: ($p["50.000000"] / 1000), p99: ($p["99.000000"] / 1000),
       p99_9: (if $p["99.900000"] then $p["99.900000"] / 1000 else null end), rdma_ops_per_io: null}
    | if .ios > 0 then . else error("no I/O") end' "$1"
}
norm_perf() {
  jq -c 'if .ios > 0 and .errors == 0 then . else error("no I/O or errors") end
    | {iops, mib_s, ios, p50: .lat_us.p50, p99: .lat_us.p99, p99_9: .lat_us.p99_9,
       rdma_ops_per_io: (.direct.rdma_ops_per_io // null)}' "$1"
}
# norm_spdk_perf FILE SECS — its "Total" line and the -L summary percentiles (µs)
norm_spdk_perf() {
  awk -v secs="$2" '
    /^Total/ { sub(/^[^:]*:/, ""); iops = $1; mib = $2 }
    /^ *50\.00000% :/ { p50 = $3 + 0 } /^ *99\.00000% :/ { p99 = $3 + 0 } /^ *99\.90000% :/ { p999 = $3 + 0 }
    function j(v) { return v == "" ? "null" : v }
    END { if (iops == "" || iops + 0 == 0) exit 1
          printf "{\"iops\":%s,\"mib_s\":%s,\"ios\":%d,\"p50\":%s,\"p99\":%s,\"p99_9\":%s,\"rdma_ops_per_io\":null}\n",
            iops, mib, iops * secs, j(p50), j(p99), j(p999) }' "$1"
}

# ---------------------------------------------------------------- one point
# measure TARGET INIT WORKLOAD RW BS QD ROUND SECS — run, account CPU, append the record
measure() {
  local target=$1 init=$2 wl=$3 rw=$4 bs=$5 qd=$6 round=$7 secs=$8
  local f=$OUT/$target--$init--$wl-r$round b0 t0 b1 t1 err=null w0 w1
  w0=$(date +%s.%N)
  b0=$(cpu_busy); t0=0; [ "$T_PID" != 0 ] && t0=$(proc_cpu "$T_PID")
  if init_run "$init" "$rw" "$bs" "$qd" "$secs" "$f" && [ -s "$f.norm" ]; then
    b1=$(cpu_busy); t1=0; [ "$T_PID" != 0 ] && t1=$(proc_cpu "$T_PID")
    w1=$(date +%s.%N)
    # started_s / wall_s: where a run's time goes (points.jsonl only; results.json keeps
    # the schema's fields)
    jq -c --argjson st "$w0" --argjson wall "$(awk -v a="$w0" -v b="$w1" 'BEGIN { printf "%.3f", b - a }')" \
      --arg t "$target" --arg i "$init" --arg w "$wl" --arg rw "$rw" --argjson bs "$bs" \
      --argjson qd "$qd" --argjson r "$round" --argjson s "$secs" --argjson hz "$HZ" \
      --argjson g $((b1 - b0)) --argjson tc $((t1 - t0)) --argjson haspid "$([ "$T_PID" != 0 ] && echo true || echo false)" \
      '{phase: (if ($t | startswith("local-")) then "local" else "fabric" end), target: $t, initiator: $i,
        workload: $w, rw: $rw, bs: $bs, qd: $qd, read_pct: (if $rw == "randrw" then 70 else null end),
        round: $r, secs: $s, ok: true, error: null, iops, mib_s, ios,
        lat_us: {p50, p99, p99_9},
        target_cpu_us_per_io: (if $haspid then $tc / $hz / .ios * 1e6 else null end),
        guest_cpu_us_per_io: ($g / $hz / .ios * 1e6), rdma_ops_per_io,
        started_s: $st, wall_s: $wall}' "$f.norm" >> "$POINTS"
    bsay "$target/$init/$wl round $round: $(jq -r '.iops | floor' "$f.norm") IOPS"
  else
    err=$(grep -v '^$' "$f.err" 2>/dev/null | tail -2 | tr '\n' ' ' | cut -c1-300)
    bsay "$target/$init/$wl round $round: failed: ${err:-no result}"
    emit_failed "$target" "$init" "$wl" "$rw" "$bs" "$qd" "$round" "$secs" "${err:-no result}"
  fi
}
emit_failed() { # TARGET INIT WORKLOAD RW BS QD ROUND SECS ERROR
  jq -nc --arg t "$1" --arg i "$2" --arg w "$3" --arg rw "$4" --argjson bs "$5" --argjson qd "$6" \
    --argjson r "$7" --argjson s "$8" --arg e "$9" \
    '{phase: (if $t == "rxe" then "rxe" elif ($t | startswith("local-")) then "local" else "fabric" end),
      target: $t, initiator: $i, workload: $w, rw: $rw, bs: $bs, qd: $qd,
      read_pct: (if $rw == "randrw" then 70 else null end), round: $r,
      secs: $s, ok: false, error: $e, iops: null, mib_s: null, ios: null,
      lat_us: {p50: null, p99: null, p99_9: null}, target_cpu_us_per_io: null,
      guest_cpu_us_per_io: null, rdma_ops_per_io: null}' >> "$POINTS"
}

# ---------------------------------------------------------------- rxe ceilings (perftest)
# rxe_measure TOOL BS ITERS ROUND — ib_write_bw (message rate, MiB/s) or ib_write_lat
# (typical / 99 % / 99.9 % latency) on the testbed's rxe device, as one record
rxe_measure() {
  local tool=$1 bs=$2 iters=$3 round=$4 dev=${NVMF_P2P_RXE%% *} f=$OUT/rxe-$1-$2-r$4 wl
  local args=(-d "$dev" -F -s "$bs" -n "$iters")
  [ "$tool" = ib_write_bw ] && args+=(-t 128)
  wl=${tool#ib_}-$(( bs / 1024 ))k; [ "$bs" -lt 1024 ] && wl=${tool#ib_}-${bs}b
  if perftest_pair "$tool" "${args[@]}" > "$f.txt" 2> "$f.err"; then
    local rec
    rec=$(awk -v s="$bs" -v tool="$tool" '$1 == s && NF >= 5 {
        if (tool == "ib_write_bw") printf "{\"iops\":%s,\"mib_s\":%s,\"p50\":null,\"p99\":null,\"p99_9\":null}", $5 * 1e6, $4
        else if (NF >= 9) printf "{\"iops\":null,\"mib_s\":null,\"p50\":%s,\"p99\":%s,\"p99_9\":%s}", $5, $8, $9
        else printf "{\"iops\":null,\"mib_s\":null,\"p50\":%s,\"p99\":null,\"p99_9\":null}", $5
        exit }' "$f.txt")
    if [ -n "$rec" ]; then
      echo "$rec" | jq -c --arg i "$tool" --arg w "$wl" --argjson bs "$bs" --argjson r "$round" --argjson n "$iters" \
        '{phase: "rxe", target: "rxe", initiator: $i, workload: $w, rw: "write", bs: $bs, qd: 1, read_pct: null,
          round: $r, secs: null, ok: true, error: null, iops, mib_s, ios: $n, lat_us: {p50, p99, p99_9},
          target_cpu_us_per_io: null, guest_cpu_us_per_io: null, rdma_ops_per_io: 1}' >> "$POINTS"
      bsay "rxe/$tool/$wl round $round: $rec"
      return 0
    fi
    echo "no result line for size $bs" >> "$f.err"
  fi
  emit_failed rxe "$tool" "$wl" write "$bs" 1 "$round" 0 "$(tail -2 "$f.err" | tr '\n' ' ' | cut -c1-300)"
}
