# shellcheck shell=bash
# Phases of scripts/bench inside the testbed VM (sourced by bench-guest.sh, after
# guest-lib.sh): bring a target up on the emulated NVMe and down again, run one
# initiator at one point, and append one JSON record per measured point to $POINTS.
# The record's fields are documented in docs/bench.md ("points.jsonl").
#
# The only copy of the bench targets' set-up: scripts/demo, bench-targets, bench-direct and
# bench-driver and bench-fio are presets of scripts/bench (their own guest scripts are
# gone). The perftest pair and the nvmet helpers come from guest-lib.sh.

BIN=${BENCH_BIN_DIR:-$NVMF_P2P_ROOT/target/release}/nvmf-p2p
ENGINE=${BENCH_BIN_DIR:-$NVMF_P2P_ROOT/target/release}/libnvmf_p2p_fio.so
SPDK=${NVMF_P2P_SPDK:-}
SPDK_BIN=$SPDK/build/bin
BNQN=nqn.2026-12.io.nvmf-p2p:bench
DHOST=nqn.2014-08.org.nvmexpress:uuid:6e766d66-7032-7000-8000-0000000000d5
BSOCK=/run/nvmf-p2p/bench.sock   # guest-local: 9p (the shared tree) cannot hold sockets
HZ=$(clk_tck)
# The per-point path runs bash builtins, the tool and one jq, nothing else: on the
# testbed's 9p root an exec costs 0.1 s (/bin/true) to 2 s (nvmf-p2p, 49 shared
# libraries) under TCG (FACTS.md, "Process start-up in the testbed").
# proc_cpu PID — user+system jiffies of PID (0 for PID 0 or a process that is gone)
proc_cpu() {
  local st f
  if [ "$1" = 0 ] || ! read -r st 2>/dev/null < "/proc/$1/stat"; then echo 0; return; fi
  st=${st##*) }          # after "pid (comm) ": field 3 (state) is f[0], utime f[11], stime f[12]
  read -ra f <<< "$st"
  echo $((f[11] + f[12]))
}
bsay() { local up; read -r up _ < /proc/uptime; echo "[bench ${up}s] $*" >&2; }
# fast_copies DIR — the bench's tools from guest memory: nvmf-p2p, the fio engine, fio, jq
# and SPDK's nvmf_tgt and spdk_nvme_perf, with every library they link, copied once into
# DIR (tmpfs) and found first (PATH, LD_LIBRARY_PATH, BIN, ENGINE, SPDK_BIN). The 9p root
# reads a binary's pages again on each start; from tmpfs the loader's share of a start
# drops by about 40 % (FACTS.md, "Process start-up in the testbed").
fast_copies() {
  local dir=$1 tools=("$BIN" "$ENGINE") t
  mkdir -p "$dir/bin" "$dir/lib" || return 1
  for t in fio jq; do tools+=("$(command -v "$t")"); done
  for t in nvmf_tgt spdk_nvme_perf; do [ -x "$SPDK_BIN/$t" ] && tools+=("$SPDK_BIN/$t"); done
  cp "${tools[@]}" "$dir/bin/" || return 1
  ldd "${tools[@]}" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u | xargs cp -t "$dir/lib/" || return 1
  BIN=$dir/bin/${BIN##*/} ENGINE=$dir/bin/${ENGINE##*/}
  [ -x "$dir/bin/spdk_nvme_perf" ] && SPDK_BIN=$dir/bin
  export PATH=$dir/bin:$PATH LD_LIBRARY_PATH=$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}
# nap SECS — sleep without an exec: a read that times out on a pipe nobody writes
exec {NAP_FD}<> <(:)
nap() { read -rt "$1" -u "$NAP_FD" _ || :; }

# wait_up PID CHECK — until CHECK succeeds (0) or PID dies (1), at most 120 s
wait_up() { local pid=$1 check=$2 k; for ((k = 0; k < 600; k++)); do eval "$check" && return 0; kill -0 "$pid" 2>/dev/null || return 1; nap 0.2; done; return 1; }

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
      [ -x "$SPDK_BIN/nvmf_tgt" ] || { echo "SPDK is not built (run scripts/setup)" >&2; return 1; }
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
      "$SPDK_BIN/nvmf_tgt" -m 0x2 -s 512 --iova-mode pa $mode -r /var/tmp/bench-spdk.sock \
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
  T_PID=0   # the driver stays: the next target_up rebinds only when it needs the other one
}

# ---------------------------------------------------------------- initiators
# our perf, one process for the whole boot (`perf --batch`: a run per input line, a JSON
# line per run), so a point does not pay the binary's start-up
# (bash sets and unsets PERF / PERF_PID itself, hence the ${...:-} below)
perf_start() {
  coproc PERF { exec taskset -c 0 "$BIN" perf --batch 2>> "$OUT/perf-batch.err"; }
}
perf_stop() { # end of input first, so it exits on its own; TERM if it does not in 5 s
  local pid=${PERF_PID:-} wfd=${PERF[1]:-} k
  [ -n "$pid" ] || return 0
  [ -n "$wfd" ] && exec {wfd}>&-
  for ((k = 0; k < 25; k++)); do kill -0 "$pid" 2>/dev/null || break; nap 0.2; done
  kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  return 0
}

# init_run INIT RW BS QD SECS OUT — one run of initiator INIT against the target that is
# up; its output goes to $(init_out INIT OUT) (flush_points reads it). RW is a fio rw
# name; randrw reads 70 %.
init_out() { case $1 in spdk_nvme_perf) echo "$2.txt" ;; *) echo "$2.json" ;; esac; }
init_run() {
  local init=$1 rw=$2 bs=$3 qd=$4 secs=$5 out=$6 mix=() line
  case $init in
    fio-libaio)
      local dev=$T_DEV
      if [ "$T_KIND" = fabric ]; then
        if [ -z "$T_KDEV" ]; then T_KDEV=$(kconnect "$T_NQN") || { T_KDEV=; echo "nvme connect failed" > "$out.err"; return 1; }; fi
        dev=$T_KDEV
      fi
      [ "$rw" = randrw ] && mix=(--rwmixread=70)
      fio_json "$out.json" "$dev" "$rw" "$bs" "$qd" "$secs" --cpus_allowed=0 "${mix[@]}" 2> "$out.err" ||
        { cat "$out.json.err" >> "$out.err" 2>/dev/null; return 1; } ;;
    fio-engine)
      local eng=(--ioengine="external:$ENGINE" --thread=1)
      case $T_KIND/$T_COMPLETIONS in
        local/*) eng+=(--mode=local --bdf="$NVMF_P2P_BDF") ;;
        fabric/) eng+=(--mode=nvmf --traddr="$NVMF_P2P_ADDR" --subnqn="$T_NQN") ;;
        fabric/*) eng+=(--mode=direct --traddr="$NVMF_P2P_ADDR" --subnqn="$T_NQN" --hostnqn="$DHOST" --completions="$T_COMPLETIONS") ;;
      esac
      [ "$rw" = randrw ] && mix=(--rwmixread=70)
      fio --name=job --rw="$rw" --bs="$bs" --iodepth="$qd" --time_based --runtime="$secs" --size=48M \
          --cpus_allowed=0 --output-format=json "${eng[@]}" "${mix[@]}" > "$out.json" 2> "$out.err" ;;
    fio-spdk)
      # SPDK's fio plugins, preloaded as SPDK's docs run them: spdk_nvme over RDMA to a
      # fabric target (fio splits file names at ':', so the NQN's colons are escaped), and
      # locally spdk_bdev on an NVMe bdev (its env_context carries the testbed's
      # --iova-mode pa, FACTS.md "SPDK"; the spdk_nvme plugin has no such option)
      local plugin=$SPDK/build/fio/spdk_nvme eng
      if [ "$T_KIND" = local ]; then
        plugin=$SPDK/build/fio/spdk_bdev
        [ -f "$OUT/spdk-bdev.json" ] || cat > "$OUT/spdk-bdev.json" <<JSON
{"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_nvme_attach_controller",
  "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "$NVMF_P2P_BDF"}}]}]}
JSON
        eng=(--ioengine=spdk_bdev --filename=Nvme0n1 --spdk_json_conf="$OUT/spdk-bdev.json"
             --spdk_mem=256 --env_context=--iova-mode=pa)
      else
        eng=(--ioengine=spdk --mem_size_mb=256
             --filename="trtype=RDMA adrfam=IPv4 traddr=$NVMF_P2P_ADDR trsvcid=4420 subnqn=${T_NQN//:/\\:} ns=1")
      fi
      [ -f "$plugin" ] || { echo "SPDK's fio plugins are not built (run scripts/setup)" > "$out.err"; return 1; }
      [ "$rw" = randrw ] && mix=(--rwmixread=70)
      LD_PRELOAD=$plugin fio --name=job --thread=1 "${eng[@]}" --rw="$rw" --bs="$bs" --iodepth="$qd" \
          --time_based --runtime="$secs" --cpus_allowed=0 --output-format=json "${mix[@]}" \
          > "$out.json" 2> "$out.err" ;;
    perf)
      local args=(-w "$rw" -o "$bs" -q "$qd" -t "$secs" --json)
      [ "$rw" = randrw ] && args+=(-M 70)
      if [ "$T_KIND" = local ]; then args+=(--local "$NVMF_P2P_BDF")
      else args+=(--traddr "$NVMF_P2P_ADDR" --subnqn "$T_NQN")
        [ -n "$T_COMPLETIONS" ] && args+=(--direct --hostnqn "$DHOST" --completions "$T_COMPLETIONS")
      fi
      if [ -z "${PERF_PID:-}" ] || ! kill -0 "$PERF_PID" 2>/dev/null; then perf_start; fi
      echo "${args[*]}" >&"${PERF[1]}"
      if ! IFS= read -r -t $((secs + 120)) line <&"${PERF[0]:-0}"; then
        echo "perf --batch gave no answer in $((secs + 120)) s (restarted for the next point)" > "$out.err"
        perf_stop; return 1
      fi
      echo "$line" > "$out.json" ;;
    spdk_nvme_perf)
      [ -x "$SPDK_BIN/spdk_nvme_perf" ] || { echo "SPDK is not built (run scripts/setup)" > "$out.err"; return 1; }
      local trid="trtype:PCIe traddr:$NVMF_P2P_BDF"
      [ "$T_KIND" = fabric ] && trid="trtype:RDMA adrfam:IPv4 traddr:$NVMF_P2P_ADDR trsvcid:4420 subnqn:$T_NQN"
      [ "$rw" = randrw ] && mix=(-M 70)
      # exit status 0 even when it attached nothing: NORM_SPDK_PERF fails without a Total line
      "$SPDK_BIN/spdk_nvme_perf" -r "$trid" -q "$qd" -o "$bs" -w "$rw" "${mix[@]}" -t "$secs" \
        -c 0x1 -s 256 --iova-mode pa -L > "$out.txt" 2> "$out.err" ;;
    *) echo "unknown initiator $init" > "$out.err"; return 1 ;;
  esac
}

# The tools' outputs, normalised by jq to {iops, mib_s, ios, p50, p99, p99_9,
# rdma_ops_per_io} (null where a tool does not say); flush_points runs them and the
# record in one jq process.
# fio: reads and writes summed; percentiles of reads (of writes for write-only)
NORM_FIO='.jobs[0] as $j | ($j.read.total_ios + $j.write.total_ios) as $n
  | (if $j.read.total_ios > 0 then $j.read else $j.write end).clat_ns.percentile as $p
  | {iops: ($j.read.iops + $j.write.iops), mib_s: (($j.read.bw_bytes + $j.write.bw_bytes) / 1048576),
     ios: $n, p50: ($p["50.000000"] / 1000), p99: ($p["99.000000"] / 1000),
     p99_9: (if $p["99.900000"] then $p["99.900000"] / 1000 else null end), rdma_ops_per_io: null}
  | if .ios > 0 then . else error("no I/O") end'
# perf --batch: its JSON line, or {"error": ...}
NORM_PERF='if .error then error(.error) elif .ios > 0 and .errors == 0 then . else error("no I/O or errors") end
  | {iops, mib_s, ios, p50: .lat_us.p50, p99: .lat_us.p99, p99_9: .lat_us.p99_9,
     rdma_ops_per_io: (.direct.rdma_ops_per_io // null)}'
# spdk_nvme_perf (text, jq -R -s): its "Total" line and the -L summary percentiles (µs).
# Its exit status is 0 even when it attached nothing: no Total line is a failure here.
NORM_SPDK_PERF='def pct($p): [scan("(?m)^\\s*" + $p + "%\\s*:\\s*([0-9.]+)us")] | if length > 0 then last[0] | tonumber else null end;
  ([scan("(?m)^Total[^:]*:\\s*([0-9.]+)\\s+([0-9.]+)")] | last) as $tot
  | if $tot == null or ($tot[0] | tonumber) == 0 then error("no Total line: spdk_nvme_perf attached nothing or measured no I/O") else . end
  | {iops: ($tot[0] | tonumber), mib_s: ($tot[1] | tonumber), ios: (($tot[0] | tonumber) * $s | floor),
     p50: pct("50\\.00000"), p99: pct("99\\.00000"), p99_9: pct("99\\.90000"), rdma_ops_per_io: null}'
# the point's record (fields: docs/bench.md, "points.jsonl"); started_s / wall_s: where a
# run's time goes (points.jsonl only; results.json keeps the schema's fields)
RECORD='{phase: (if ($t | startswith("local-")) then "local" else "fabric" end), target: $t, initiator: $i,
    workload: $w, rw: $rw, bs: $bs, qd: $qd, read_pct: (if $rw == "randrw" then 70 else null end),
    round: $r, secs: $s, ok: true, error: null, iops, mib_s, ios,
    lat_us: {p50, p99, p99_9},
    target_cpu_us_per_io: (if $haspid then $tc / $hz / .ios * 1e6 else null end),
    guest_cpu_us_per_io: ($g / $hz / .ios * 1e6), rdma_ops_per_io,
    started_s: $w0, wall_s: ((($w1 - $w0) * 1000 | round) / 1000)}'
FAILED='{phase: (if $t == "rxe" then "rxe" elif ($t | startswith("local-")) then "local" else "fabric" end),
    target: $t, initiator: $i, workload: $w, rw: $rw, bs: $bs, qd: $qd,
    read_pct: (if $rw == "randrw" then 70 else null end), round: $r,
    secs: $s, ok: false, error: $e, iops: null, mib_s: null, ios: null,
    lat_us: {p50: null, p99: null, p99_9: null}, target_cpu_us_per_io: null,
    guest_cpu_us_per_io: null, rdma_ops_per_io: null}'
# One jq process turns every measured point of a target session into its record, at the
# session's end (flush_points): a jq start costs 0.5 s under TCG, most of what a point's
# accounting used to cost. Point K waits in PENDING as jq arguments: --rawfile oK (the
# tool's output), --rawfile eK (its stderr) and --argjson mK (the accounting).
FLUSH_PROG="def nfio: $NORM_FIO;
def nperf: $NORM_PERF;
def nspdk(\$s): $NORM_SPDK_PERF;
def record(\$m): \$m.t as \$t | \$m.i as \$i | \$m.w as \$w | \$m.rw as \$rw | \$m.bs as \$bs | \$m.qd as \$qd
  | \$m.r as \$r | \$m.s as \$s | \$m.w0 as \$w0 | \$m.w1 as \$w1 | \$m.g as \$g | \$m.tc as \$tc
  | \$m.haspid as \$haspid | $RECORD;
def failed(\$m; \$e): \$m.t as \$t | \$m.i as \$i | \$m.w as \$w | \$m.rw as \$rw | \$m.bs as \$bs | \$m.qd as \$qd
  | \$m.r as \$r | \$m.s as \$s | $FAILED;
\$ARGS.named as \$a
| range(0; [\$a | keys[] | select(startswith(\"m\"))] | length) as \$k
| \$a[\"m\\(\$k)\"] as \$m
| try (\$a[\"o\\(\$k)\"] | if \$m.i == \"spdk_nvme_perf\" then nspdk(\$m.s) elif \$m.i == \"perf\" then fromjson | nperf
       else fromjson | nfio end | record(\$m))
  catch failed(\$m; ([tostring] + (\$a[\"e\\(\$k)\"] | split(\"\\n\") | map(select(length > 0)) | .[-2:]))
                     | join(\" \") | .[0:300])"
PENDING=() PEND_IDS=() NPEND=0   # PEND_IDS: "TARGET INIT WORKLOAD RW BS QD ROUND SECS" per point
flush_points() {
  local rec n=0 k
  [ "$NPEND" -gt 0 ] || return 0
  while IFS= read -r rec; do
    n=$((n + 1))
    echo "$rec" >> "$POINTS"
    if [[ $rec =~ \"target\":\"([^\"]*)\",\"initiator\":\"([^\"]*)\",\"workload\":\"([^\"]*)\".*\"round\":([0-9]+).*\"ok\":true.*\"iops\":([0-9]+) ]]; then
      bsay "${BASH_REMATCH[1]}/${BASH_REMATCH[2]}/${BASH_REMATCH[3]} round ${BASH_REMATCH[4]}: ${BASH_REMATCH[5]} IOPS"
    elif [[ $rec =~ \"target\":\"([^\"]*)\",\"initiator\":\"([^\"]*)\",\"workload\":\"([^\"]*)\".*\"round\":([0-9]+).*\"error\":\"([^\"]*)\" ]]; then
      bsay "${BASH_REMATCH[1]}/${BASH_REMATCH[2]}/${BASH_REMATCH[3]} round ${BASH_REMATCH[4]}: failed: ${BASH_REMATCH[5]}"
    fi
  done < <(jq -nc --argjson hz "$HZ" "${PENDING[@]}" "$FLUSH_PROG" 2>> "$OUT/flush.err")
  # jq failing as a whole (it gives a record per point otherwise) loses no point either
  for ((k = n; k < NPEND; k++)); do
    # shellcheck disable=SC2086
    emit_failed ${PEND_IDS[k]} "accounting failed: $(tail -1 "$OUT/flush.err" 2>/dev/null | cut -c1-200)"
  done
  PENDING=() PEND_IDS=() NPEND=0
}

# ---------------------------------------------------------------- one point
# measure TARGET INIT WORKLOAD RW BS QD ROUND SECS — run and account one point; its
# record is written by the next flush_points (a failed run's at once, after the pending)
measure() {
  local target=$1 init=$2 wl=$3 rw=$4 bs=$5 qd=$6 round=$7 secs=$8
  local f=$OUT/$target--$init--$wl-r$round b0 t0 b1 t1 w0 w1 err haspid=false
  [ "$T_PID" != 0 ] && haspid=true
  w0=$EPOCHREALTIME b0=$(cpu_busy) t0=$(proc_cpu "$T_PID")
  if init_run "$init" "$rw" "$bs" "$qd" "$secs" "$f"; then
    b1=$(cpu_busy) t1=$(proc_cpu "$T_PID") w1=$EPOCHREALTIME
    [ -f "$f.err" ] || : > "$f.err"
    PENDING+=(--rawfile "o$NPEND" "$(init_out "$init" "$f")" --rawfile "e$NPEND" "$f.err"
              --argjson "m$NPEND" "{\"t\":\"$target\",\"i\":\"$init\",\"w\":\"$wl\",\"rw\":\"$rw\",\"bs\":$bs,\"qd\":$qd,\"r\":$round,\"s\":$secs,\"w0\":$w0,\"w1\":$w1,\"g\":$((b1 - b0)),\"tc\":$((t1 - t0)),\"haspid\":$haspid}")
    PEND_IDS+=("$target $init $wl $rw $bs $qd $round $secs")
    NPEND=$((NPEND + 1))
    return 0
  fi
  flush_points
  err=$(grep -v '^$' "$f.err" 2>/dev/null | tail -2 | tr '\n' ' ' | cut -c1-300)
  bsay "$target/$init/$wl round $round: failed: ${err:-no result}"
  emit_failed "$target" "$init" "$wl" "$rw" "$bs" "$qd" "$round" "$secs" "${err:-no result}"
}
emit_failed() { # TARGET INIT WORKLOAD RW BS QD ROUND SECS ERROR
  jq -nc --arg t "$1" --arg i "$2" --arg w "$3" --arg rw "$4" --argjson bs "$5" --argjson qd "$6" \
    --argjson r "$7" --argjson s "$8" --arg e "$9" "$FAILED" >> "$POINTS"
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
