#!/bin/bash
# Runs inside the testbed VM (see scripts/testbed): prepares devices, then runs the command.
# $1 = the run directory (writable, shared with the host).
RUN=$1
# shellcheck disable=SC1091
. "$RUN/env.sh"
export PATH
export NVMF_P2P_IN_VM=1
ADDR=10.99.0.1
say() { echo "[guest $(cut -d' ' -f1 /proc/uptime)s] $*"; }
setup_fail() { say "setup failed: $*"; dmesg > "$RUN/dmesg.log" 2>&1; exit 1; }

say "kernel $(uname -r) up"
# keep kernel messages off the console from here on (dmesg is saved at the end)
dmesg -n 1 2>/dev/null || true
for m in configfs vfio-pci rdma_rxe nvme-rdma nvmet nvmet-rdma; do
  modprobe "$m" 2>/dev/null || say "modprobe $m failed"
done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config ||
  setup_fail "cannot mount configfs on /sys/kernel/config"

# ---- NVMe: the QEMU controller (1b36:0010), to vfio-pci unless asked to keep nvme
BDF=$(for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor")" = 0x1b36 ] && [ "$(cat "$d/device")" = 0x0010 ] && basename "$d"
      done | head -1)
[ -n "$BDF" ] || setup_fail "no QEMU NVMe controller (1b36:0010) found"
D=/sys/bus/pci/devices/$BDF
drv() { if [ -e "$D/driver" ]; then basename "$(readlink "$D/driver")"; else echo none; fi; }
if [ "$NVMF_P2P_KERNEL_NVME" != 1 ]; then
  udevadm settle -t 10 2>/dev/null || true
  echo vfio-pci > "$D/driver_override"
  [ -e "$D/driver" ] && echo "$BDF" > "$D/driver/unbind"
  echo "$BDF" > /sys/bus/pci/drivers_probe
  [ "$(drv)" = vfio-pci ] || setup_fail "could not bind $BDF to vfio-pci (driver: $(drv))"
  G=$(basename "$(readlink "$D/iommu_group")")
  for _ in $(seq 50); do [ -c "/dev/vfio/$G" ] && break; sleep 0.1; done
  [ -c "/dev/vfio/$G" ] || setup_fail "/dev/vfio/$G did not appear"
fi

# ---- soft-RoCE on a veth pair; the address exists only in this VM
ip link set lo up
ip link add veth0 type veth peer name veth1 || setup_fail "veth"
ip addr add $ADDR/24 dev veth0
ip link set veth0 up; ip link set veth1 up
rdma link add rxe0 type rxe netdev veth0 || setup_fail "rdma link add rxe0 (rdma_rxe loaded?)"
RXE=$(rdma link show 2>/dev/null | awk '{print $2}' | cut -d/ -f1 | tr '\n' ' ' | sed 's/ $//')

# ---- SPDK apps (built by scripts/setup): hugepages, writable /var/tmp, the prefix.
# 2 MiB pages from what the guest has beyond 2 GiB (scripts/test boots with --mem 3G),
# at most 512; SPDK apps in the tests run with -s/--mem-size below that.
mountpoint -q /dev/hugepages || { mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages; } ||
  say "cannot mount hugetlbfs on /dev/hugepages: SPDK apps will not start"
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
HP=$(( (MEM_MB - 2048) / 2 )); [ $HP -gt 512 ] && HP=512
if [ $HP -gt 0 ]; then echo $HP > /proc/sys/vm/nr_hugepages; fi
( : > /var/tmp/.nvmf-p2p-w ) 2>/dev/null && rm -f /var/tmp/.nvmf-p2p-w || mount -t tmpfs tmpfs /var/tmp
mkdir -p /run/dpdk 2>/dev/null || true
NVMF_P2P_SPDK=$(cat "$NVMF_P2P_CACHE/spdk-prefix" 2>/dev/null || true)
export NVMF_P2P_SPDK NVMF_P2P_HUGEPAGES=$(cat /proc/sys/vm/nr_hugepages)

export NVMF_P2P_BDF=$BDF NVMF_P2P_RXE=$RXE NVMF_P2P_ADDR=$ADDR
say "ready: NVMF_P2P_BDF=$BDF ($(drv)) NVMF_P2P_RXE='$RXE' NVMF_P2P_ADDR=$ADDR hugepages=$NVMF_P2P_HUGEPAGES SPDK=${NVMF_P2P_SPDK:-none}"
cd "$NVMF_P2P_ROOT" || setup_fail "cannot cd to $NVMF_P2P_ROOT"
echo "@@nvmf-p2p:cmd-start@@"
"${NVMF_P2P_CMD[@]}"
RC=$?
echo "@@nvmf-p2p:cmd-end@@"
dmesg > "$RUN/dmesg.log" 2>&1
echo "$RC" > "$RUN/rc"
say "command exited with status $RC"
exit "$RC"
