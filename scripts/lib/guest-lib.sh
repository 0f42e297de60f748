# shellcheck shell=bash
# Shell helpers for commands that run inside the testbed VM (sourced, not executed):
# moving the NVMe between vfio-pci and the kernel driver, the kernel NVMe-oF target and
# initiator, fio with JSON results, CPU accounting. Functions print errors to stderr and
# return non-zero; callers decide.

: "${NVMF_P2P_BDF:?not inside the testbed VM (run through scripts/testbed)}"
KNQN=${KNQN:-nqn.2026-11.io.nvmf-p2p:kernel-baseline}
CFS=/sys/kernel/config/nvmet

_pcidev() { echo "/sys/bus/pci/devices/$NVMF_P2P_BDF"; }
nvme_driver() {
  local d; d=$(_pcidev)
  if [ -e "$d/driver" ]; then basename "$(readlink "$d/driver")"; else echo none; fi
}

# nvme_rebind DRIVER — move the NVMe to DRIVER (nvme | vfio-pci) with driver_override
nvme_rebind() {
  local want=$1 d; d=$(_pcidev)
  [ "$(nvme_driver)" = "$want" ] && return 0
  if [ "$want" = vfio-pci ]; then echo vfio-pci > "$d/driver_override"; else echo > "$d/driver_override"; fi
  [ -e "$d/driver" ] && echo "$NVMF_P2P_BDF" > "$d/driver/unbind"
  echo "$NVMF_P2P_BDF" > /sys/bus/pci/drivers_probe
  [ "$(nvme_driver)" = "$want" ] || { echo "rebind of $NVMF_P2P_BDF to $want failed (now $(nvme_driver))" >&2; return 1; }
  if [ "$want" = vfio-pci ]; then
    local g; g=$(basename "$(readlink "$d/iommu_group")")
    for _ in $(seq 50); do [ -c "/dev/vfio/$g" ] && return 0; sleep 0.1; done
    echo "/dev/vfio/$g did not appear" >&2; return 1
  fi
}

# ns_of_nqn NQN — /dev/nvmeXnY of the first namespace of the subsystem NQN (waits ~10 s)
ns_of_nqn() {
  local nqn=$1 s n
  for _ in $(seq 100); do
    # multipath namespaces sit under the subsystem, private ones under the controller
    for s in /sys/class/nvme-subsystem/* /sys/class/nvme/*; do
      [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$nqn" ] || continue
      n=$(ls "$s" | grep -E '^nvme[0-9]+n[0-9]+$' | head -1)
      [ -n "$n" ] && [ -b "/dev/$n" ] && { echo "/dev/$n"; return 0; }
    done
    sleep 0.1
  done
  echo "no namespace of $nqn appeared" >&2; return 1
}

# nvme_kernel_blockdev — /dev/nvmeXnY of the NVMe while the kernel driver owns it
nvme_kernel_blockdev() {
  local c
  for _ in $(seq 100); do
    c=$(ls -d "$(_pcidev)"/nvme/nvme* 2>/dev/null | head -1)
    [ -n "$c" ] && [ -s "$c/subsysnqn" ] && { ns_of_nqn "$(cat "$c/subsysnqn")"; return; }
    sleep 0.1
  done
  echo "the kernel nvme driver did not bring up $NVMF_P2P_BDF" >&2; return 1
}

# knvmet_start DEVICE_PATH — kernel nvmet-rdma target exporting DEVICE_PATH on $NVMF_P2P_ADDR:4420
knvmet_start() {
  local dev=$1 s=$CFS/subsystems/$KNQN p=$CFS/ports/1
  mkdir -p "$s" && echo 1 > "$s/attr_allow_any_host" || return 1
  mkdir -p "$s/namespaces/1"
  echo -n "$dev" > "$s/namespaces/1/device_path"
  echo 1 > "$s/namespaces/1/enable" || { echo "nvmet: enabling namespace $dev failed" >&2; return 1; }
  mkdir -p "$p"
  echo rdma > "$p/addr_trtype"; echo ipv4 > "$p/addr_adrfam"
  echo "$NVMF_P2P_ADDR" > "$p/addr_traddr"; echo 4420 > "$p/addr_trsvcid"
  ln -sf "$s" "$p/subsystems/$KNQN"
}
knvmet_stop() {
  local s=$CFS/subsystems/$KNQN p=$CFS/ports/1
  rm -f "$p/subsystems/$KNQN" 2>/dev/null; rmdir "$p" 2>/dev/null
  [ -d "$s/namespaces/1" ] && { echo 0 > "$s/namespaces/1/enable"; rmdir "$s/namespaces/1"; }
  rmdir "$s" 2>/dev/null
  return 0
}

# kconnect NQN [PORT] — kernel initiator; prints the new namespace's block device
kconnect() {
  nvme connect -t rdma -n "$1" -a "$NVMF_P2P_ADDR" -s "${2:-4420}" >/dev/null || return 1
  ns_of_nqn "$1"
}
kdisconnect() { nvme disconnect -n "$1" >/dev/null; }

# cpu_busy — busy jiffies of all CPUs so far (user+nice+system+irq+softirq+steal); bash
# builtins only: on the testbed's 9p root every exec costs 0.1-2 s (FACTS.md)
cpu_busy() {
  local _cpu u n s _idle _iow irq sirq st
  read -r _cpu u n s _idle _iow irq sirq st _ < /proc/stat
  echo $((u + n + s + irq + sirq + st))
}
clk_tck() { getconf CLK_TCK; }

# fio_json OUT DEV RW BS QD SECS [extra fio args] — run fio, JSON to OUT
fio_json() {
  local out=$1 dev=$2 rw=$3 bs=$4 qd=$5 secs=$6; shift 6
  fio --name=job --filename="$dev" --rw="$rw" --bs="$bs" --iodepth="$qd" --ioengine=libaio \
      --direct=1 --runtime="$secs" --time_based --group_reporting --output-format=json \
      "$@" > "$out" 2> "$out.err"
}
# fio_get OUT DIR(read|write) FIELD(iops|p50|p99) — p50/p99 in microseconds
fio_get() {
  local out=$1 dir=$2 f=$3
  case "$f" in
    iops) jq -r ".jobs[0].$dir.iops | floor" "$out" ;;
    p50) jq -r ".jobs[0].$dir.clat_ns.percentile[\"50.000000\"] / 1000 | floor" "$out" ;;
    p99) jq -r ".jobs[0].$dir.clat_ns.percentile[\"99.000000\"] / 1000 | floor" "$out" ;;
    ios) jq -r ".jobs[0].$dir.total_ios" "$out" ;;
  esac
}

# perftest_pair TOOL ARGS... — a perftest server (TOOL ARGS) in the background and its
# client (TOOL ARGS $NVMF_P2P_ADDR, up to 3 tries); prints the client's output. Scratch
# logs go to ${PERFTEST_LOGS:-/tmp}.
perftest_pair() {
  local tool=$1 logs=${PERFTEST_LOGS:-/tmp}; shift
  "$tool" "$@" >"$logs/perftest-server.log" 2>&1 &
  local srv=$! ok=0
  sleep 1
  for _ in 1 2 3; do
    if "$tool" "$@" "$NVMF_P2P_ADDR" >"$logs/perftest-client.log" 2>&1; then ok=1; break; fi
    sleep 1
  done
  wait "$srv" || true
  if [ "$ok" = 0 ]; then
    echo "perftest $tool $* failed:" >&2
    cat "$logs/perftest-client.log" "$logs/perftest-server.log" >&2
    return 1
  fi
  cat "$logs/perftest-client.log"
}
