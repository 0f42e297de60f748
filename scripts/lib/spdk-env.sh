# scripts/lib/spdk-env.sh — source it to use the SPDK that scripts/setup built
# (scripts/lib/spdk-build.sh). On the host and in the testbed guest (which sees the host's
# ~/.cache read-only). Sets, when SPDK is installed:
#   SPDK_PREFIX   the SPDK build tree (include/, build/lib, dpdk/build/lib, scripts/)
#   SPDK_BIN      its apps: $SPDK_BIN/spdk_nvme_perf, spdk_nvme_identify, nvmf_tgt,
#                 nvme_fuzz (all find their libraries by rpath: no LD_LIBRARY_PATH needed)
#   SPDK_RPC      scripts/rpc.py (run it with /usr/bin/python3)
#   SPDK_FIO      the fio plugins' directory (spdk_nvme, spdk_bdev), if built
#   PKG_CONFIG_PATH  prepended with SPDK's and DPDK's .pc directories
# and returns 0; returns 1 with SPDK_PREFIX empty when SPDK is not installed (the caller
# decides: `. scripts/lib/spdk-env.sh || echo "no SPDK: run scripts/setup"`).
#
# SPDK apps in the testbed need `--iova-mode pa` (or `--env_context=--iova-mode=pa` for the
# fio plugins) and hugepages (FACTS.md "SPDK"); NVMF_P2P_SPDK_PREFIX overrides the prefix.
SPDK_PREFIX=${NVMF_P2P_SPDK_PREFIX:-}
if [ -z "$SPDK_PREFIX" ]; then
  _spdk_file=${XDG_CACHE_HOME:-$HOME/.cache}/nvmf-p2p/spdk-prefix
  # in the guest HOME may differ from the host's: fall back to root's cache
  [ -f "$_spdk_file" ] || _spdk_file=/root/.cache/nvmf-p2p/spdk-prefix
  [ -f "$_spdk_file" ] && SPDK_PREFIX=$(cat "$_spdk_file")
  unset _spdk_file
fi
if [ -n "$SPDK_PREFIX" ] && [ -x "$SPDK_PREFIX/build/bin/spdk_nvme_perf" ]; then
  SPDK_BIN=$SPDK_PREFIX/build/bin
  SPDK_RPC=$SPDK_PREFIX/scripts/rpc.py
  SPDK_FIO=
  [ -f "$SPDK_PREFIX/build/fio/spdk_bdev" ] && SPDK_FIO=$SPDK_PREFIX/build/fio
  PKG_CONFIG_PATH=$SPDK_PREFIX/build/lib/pkgconfig:$SPDK_PREFIX/dpdk/build/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
  export SPDK_PREFIX SPDK_BIN SPDK_RPC SPDK_FIO PKG_CONFIG_PATH
  true
else
  SPDK_PREFIX=
  false
fi
