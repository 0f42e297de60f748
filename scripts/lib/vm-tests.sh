#!/usr/bin/env bash
# Runs inside the testbed VM (called by scripts/test): the testbed self-check, then every
# VM test binary listed in $1 (lines "NAME PATH"), one at a time, single-threaded since
# they share the NVMe device and the rxe port. Each binary's libtest summary is printed;
# a binary that dies without one is reported as "vm-test: NAME FAILED (status N)".
set -uo pipefail
LIST=$1
run() { # NAME CMD...
  local name=$1; shift
  local t0 log=$NVMF_P2P_SCRATCH/vm-$name.log
  t0=$(date +%s)
  echo "---- vm: $name"
  "$@" > "$log" 2>&1
  local rc=$?
  cat "$log"
  if ! grep -q '^test result: ' "$log"; then
    if [ $rc = 0 ]; then echo "vm-test: $name ok"; else echo "vm-test: $name FAILED (status $rc)"; fi
  elif [ $rc != 0 ] && ! grep -q '^test result: FAILED' "$log"; then
    echo "vm-test: $name FAILED (status $rc after its summary)"
  fi
  echo "---- vm: $name took $(( $(date +%s) - t0 ))s"
}
run testbed-selftest scripts/testbed-selftest --quick
while read -r name path; do
  [ -n "$name" ] || continue
  run "$name" env RUST_BACKTRACE=1 "$path" --test-threads=1
  # every test must leave the NVMe on vfio-pci for the next one
  d=/sys/bus/pci/devices/$NVMF_P2P_BDF
  drv=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)
  [ "$drv" = vfio-pci ] || echo "vm-test: $name left the NVMe on '${drv:-no driver}' FAILED"
done < "$LIST"
exit 0
