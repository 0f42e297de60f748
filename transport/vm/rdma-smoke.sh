#!/usr/bin/env bash
# Runs inside the testbed VM (scripts/testbed -- bash transport/vm/rdma-smoke.sh):
# our target (examples/rdma_target, built on the host) on soft-RoCE, the kernel
# initiator against it: discover, connect, identify, write/read-verify, logs, disconnect.
set -euo pipefail
PROFILE=${PROFILE:-debug}
BIN=${RDMA_TARGET_BIN:-/work/target-transport/$PROFILE/examples/rdma_target}
PERF=${RDMA_PERF_BIN:-/work/target-transport/$PROFILE/examples/rdma_perf}
ADDR=${NVMF_P2P_ADDR:-10.99.0.1}
S=${NVMF_P2P_SCRATCH:-/tmp}
NQN=nqn.2026-11.io.nvmf-p2p:smoke
HOST=$(cat /etc/nvme/hostnqn 2>/dev/null || echo nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555)
truncate -s 64M "$S/ns-file.img"
cat > "$S/target.toml" <<CFG
queue_depth = 128
[[listener]]
trtype = "rdma"
address = "$ADDR"
[[subsystem]]
nqn = "$NQN"
allow_any_host = true
[[subsystem.namespace]]
backend = "ram:64MiB"
[[subsystem.namespace]]
backend = "file:$S/ns-file.img"
CFG
modprobe nvme-rdma 2>/dev/null || true
RUST_LOG=${RUST_LOG:-info} "$BIN" "$S/target.toml" 240 2> "$S/target.log" &
TPID=$!
fail() { echo "SMOKE FAIL: $*"; tail -40 "$S/target.log"; kill "$TPID" 2>/dev/null; exit 1; }
for _ in $(seq 60); do grep -q "listening" "$S/target.log" && break; sleep 0.5; done
grep -q "listening" "$S/target.log" || fail "target did not start listening"
echo "== discover"
nvme discover -t rdma -a "$ADDR" -s 4420 -q "$HOST" | tee "$S/discover.txt" || fail discover
grep -q "$NQN" "$S/discover.txt" || fail "subsystem not in discovery log"
echo "== connect"
nvme connect -t rdma -n "$NQN" -a "$ADDR" -s 4420 -q "$HOST" || fail connect
sleep 2
DEV=$(for d in /sys/class/nvme/nvme*; do
        [ "$(cat "$d/subsysnqn" 2>/dev/null)" = "$NQN" ] && basename "$d"; done | head -1)
[ -n "$DEV" ] || fail "no controller for $NQN"
echo "controller $DEV"
nvme id-ctrl "/dev/$DEV" | grep -E "^(sn|mn|mdts|cntlid|sgls|ioccsz|iorcsz|msdbd|subnqn) " || fail id-ctrl
# /sys/class/nvme/nvme0/nvme0c0n1 is the hidden per-path node of block device nvme0n1.
NS=$(ls /sys/class/nvme/$DEV/ | grep -E "^nvme[0-9]+c[0-9]+n[0-9]+$" | sed -E "s/c[0-9]+n/n/" | sort)
NS1=/dev/$(echo "$NS" | sed -n 1p)
NS2=/dev/$(echo "$NS" | sed -n 2p)
[ -b "$NS1" ] && [ -b "$NS2" ] || fail "namespace block devices missing: $NS1 $NS2"
echo "namespaces $NS1 $NS2"
lsblk "$NS1" "$NS2" || true
for ns in "$NS1" "$NS2"; do
  echo "== write/read verify on $ns"
  head -c 4194304 /dev/urandom > "$S/pattern"
  dd if="$S/pattern" of="$ns" bs=128k oflag=direct status=none || fail "write $ns"
  dd if="$ns" of="$S/back" bs=128k count=32 iflag=direct status=none || fail "read $ns"
  cmp "$S/pattern" "$S/back" || fail "data mismatch on $ns"
  # small in-capsule writes
  dd if="$S/pattern" of="$ns" bs=4k count=64 seek=4096 oflag=direct status=none || fail "4k write $ns"
  dd if="$ns" of="$S/back4k" bs=4k count=64 skip=4096 iflag=direct status=none || fail "4k read $ns"
  cmp <(head -c 262144 "$S/pattern") "$S/back4k" || fail "4k mismatch on $ns"
done
nvme smart-log "/dev/$DEV" | tee "$S/smart.txt" | head -20 || fail smart-log
W=$(awk -F: '/host_write_commands/ {gsub(/[ \t]/,"",$2); print $2}' "$S/smart.txt")
[ "${W:-0}" -gt 0 ] || fail "target saw no writes (host_write_commands=$W)"
nvme error-log "/dev/$DEV" -e 2 | head -10 || fail error-log
nvme get-feature "/dev/$DEV" -f 7 || fail get-feature
nvme list-subsys || true
if command -v fio >/dev/null; then
  echo "== fio randwrite+verify QD32 (10 s)"
  fio --name=v --filename="$NS1" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
      --iodepth=32 --size=16M --verify=crc32c --verify_state_save=0 \
      --output="$S/fio.txt" || fail fio
  grep -E "IOPS|err=" "$S/fio.txt" | head -4
fi
echo "== disconnect"
nvme disconnect -n "$NQN" || fail disconnect
sleep 1
echo "== our userspace initiator against our target"
"$PERF" "$ADDR:4420" "$NQN" 32 5 4096 read | tee "$S/perf-ours-read.json" || fail "rdma_perf read (ours)"
"$PERF" "$ADDR:4420" "$NQN" 32 5 4096 write | tee "$S/perf-ours-write.json" || fail "rdma_perf write (ours)"
kill -TERM "$TPID"
wait "$TPID" || true
grep -c "controller created" "$S/target.log" || true
tail -3 "$S/target.log"
echo "== our userspace initiator against the kernel nvmet-rdma target"
modprobe nvmet-rdma 2>/dev/null || true
C=/sys/kernel/config/nvmet
KNQN=nqn.2026-11.io.nvmf-p2p:kernel
# A RAM block device like our ram namespace (a file on the guest's /tmp reports 1-byte
# blocks through nvmet's file backend).
if modprobe null_blk nr_devices=1 memory_backed=1 gb=1 bs=512 2>/dev/null && [ -b /dev/nullb0 ]; then
  KDEV=/dev/nullb0
else
  truncate -s 64M /tmp/kernel-ns.img
  KDEV=$(losetup -f --show /tmp/kernel-ns.img)
fi
echo "kernel target namespace: $KDEV"
mkdir -p "$C/subsystems/$KNQN/namespaces/1" "$C/ports/7"
echo 1 > "$C/subsystems/$KNQN/attr_allow_any_host"
echo -n "$KDEV" > "$C/subsystems/$KNQN/namespaces/1/device_path"
echo 1 > "$C/subsystems/$KNQN/namespaces/1/enable"
echo rdma > "$C/ports/7/addr_trtype"
echo ipv4 > "$C/ports/7/addr_adrfam"
echo "$ADDR" > "$C/ports/7/addr_traddr"
echo 4421 > "$C/ports/7/addr_trsvcid"
ln -s "$C/subsystems/$KNQN" "$C/ports/7/subsystems/$KNQN"
sleep 1
"$PERF" "$ADDR:4421" "$KNQN" 32 5 4096 read | tee "$S/perf-kernel-read.json" || { echo "SMOKE FAIL: rdma_perf against kernel target"; dmesg | tail -20; exit 1; }
"$PERF" "$ADDR:4421" "$KNQN" 32 5 4096 write | tee "$S/perf-kernel-write.json" || { echo "SMOKE FAIL: rdma_perf write against kernel target"; dmesg | tail -20; exit 1; }
echo "SMOKE OK"
