# shellcheck shell=bash
# instr_per_io QD [ROUNDS] — the NVMe driver's instructions per I/O on the submitting and
# completing thread (valgrind callgrind over nvme/examples/instr_per_io against the
# simulator; the simulator thread is not counted); prints one number. Host-side, sourced
# by scripts/bench-driver and scripts/bench; needs the example built in release mode.
instr_per_io() {
  local qd=$1 rounds=${2:-2000} out ir
  out=$(mktemp)
  valgrind --tool=callgrind --callgrind-out-file="$out" \
    --toggle-collect='instr_per_io::submit_batch' --toggle-collect='instr_per_io::reap_batch' \
    "${CARGO_TARGET_DIR:-target}/release/examples/instr_per_io" "$qd" "$rounds" >/dev/null 2>&1 ||
    { rm -f "$out"; echo "valgrind failed on instr_per_io" >&2; return 1; }
  ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$out")
  rm -f "$out"
  awk -v ir="$ir" -v n=$((qd * rounds)) 'BEGIN { printf "%.0f\n", ir / n }'
}
