#!/usr/bin/env bash
# scripts/lib/spdk-build.sh — build SPDK (shared libraries, RDMA, fio plugins when a fio
# source tree is ready, nvme_fuzz) into a cache directory; called by scripts/setup.
#
# The build tree is the prefix: $CACHE/spdk-<version>/ holds build/bin (apps, patched to
# find their libraries without LD_LIBRARY_PATH), build/lib (SPDK .so + pkgconfig),
# dpdk/build/lib (DPDK), include/ and scripts/rpc.py. Its path goes to $CACHE/spdk-prefix
# once the build passed its checks; scripts/lib/spdk-env.sh reads it.
#
# Idempotent: $PREFIX/.nvmf-p2p-stamp records the inputs (tarball checksums or the source
# directory's revision), the configure flags and the recipe version; when it matches and
# the checked files exist, nothing is built.
#
# Inputs: ../shared/vendor/{spdk-v26.05,dpdk-v25.11,isa-l-v2.24.0}.tar.xz (NVMF_P2P_VENDOR
# overrides the directory), or NVMF_P2P_SPDK_SRC=DIR: an SPDK source tree with dpdk/ and
# isa-l/ inside (copied, never built in place); without either, the tag v26.05 is cloned from
# github.com/spdk/spdk with its submodules into $CACHE/spdk-git-v26.05. The fio plugins need the configured fio
# source tree that scripts/setup prepares first (scripts/lib/fio-source.sh); without it
# they are left out.
#
# Facts behind the recipe: FACTS.md "SPDK" (system python3 with pyelftools, exact DPDK
# 25.11.0, --target-arch=x86-64-v2 for the TCG guest, --with-fio excludes --disable-examples).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/nvmf-p2p
VENDOR=${NVMF_P2P_VENDOR:-$ROOT/../shared/vendor}
RECIPE=1   # bump when the recipe below changes in a way that needs a rebuild
VERSION=v26.05
LOG=$CACHE/spdk-build.log
STEP="SPDK inputs"

log() { echo "[setup] $*"; }
fail() { echo "[setup] FAILED at step '$STEP': $*" >&2; exit 1; }

mkdir -p "$CACHE"
# DPDK's meson runs python3 from PATH and needs Debian's python3 with pyelftools: keep
# pyenv shims and the like off PATH for the whole build.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH VIRTUAL_ENV PYENV_VERSION || true

# ------------------------------------------------------------------ inputs
# Without the vendored tarballs (a user's machine with network): the release tag from
# SPDK's repository, with its submodules (DPDK, ISA-L), once, into the cache.
if [ -z "${NVMF_P2P_SPDK_SRC:-}" ] && [ ! -f "$VENDOR/spdk-$VERSION.tar.xz" ]; then
  GIT_SRC=$CACHE/spdk-git-$VERSION
  if [ ! -f "$GIT_SRC/.nvmf-p2p-fetched" ]; then
    command -v git >/dev/null || fail "$VENDOR/spdk-$VERSION.tar.xz is missing and git is not installed to fetch SPDK $VERSION: install git or set NVMF_P2P_SPDK_SRC=DIR"
    log "no $VENDOR/spdk-$VERSION.tar.xz: fetching SPDK $VERSION from https://github.com/spdk/spdk (with submodules)"
    rm -rf "$GIT_SRC"
    git clone -q --depth 1 --branch "$VERSION" --recurse-submodules --shallow-submodules \
        https://github.com/spdk/spdk "$GIT_SRC" >>"$CACHE/spdk-fetch.log" 2>&1 ||
      fail "$VENDOR/spdk-$VERSION.tar.xz is missing and fetching tag $VERSION from https://github.com/spdk/spdk failed (see $CACHE/spdk-fetch.log): set NVMF_P2P_SPDK_SRC=DIR"
    touch "$GIT_SRC/.nvmf-p2p-fetched"
  fi
  NVMF_P2P_SPDK_SRC=$GIT_SRC
fi
if [ -n "${NVMF_P2P_SPDK_SRC:-}" ]; then
  SRC=$(cd "$NVMF_P2P_SPDK_SRC" 2>/dev/null && pwd) ||
    fail "NVMF_P2P_SPDK_SRC=$NVMF_P2P_SPDK_SRC is not a directory"
  [ -x "$SRC/configure" ] && [ -f "$SRC/dpdk/meson.build" ] && [ -f "$SRC/isa-l/autogen.sh" ] ||
    fail "NVMF_P2P_SPDK_SRC=$SRC is not an SPDK source tree with dpdk/ and isa-l/ inside (git submodule update --init)"
  rev=$(git -C "$SRC" describe --tags --always --dirty 2>/dev/null || cat "$SRC/VERSION")
  INPUTS="src=$SRC@$rev"
  PREFIX=$CACHE/spdk-src
else
  TARS=("$VENDOR/spdk-$VERSION.tar.xz" "$VENDOR/dpdk-v25.11.tar.xz" "$VENDOR/isa-l-v2.24.0.tar.xz")
  for t in "${TARS[@]}"; do
    [ -f "$t" ] || fail "$t is missing: put the SPDK, DPDK and ISA-L tarballs there (see its README) or set NVMF_P2P_SPDK_SRC=DIR"
  done
  # checksums are cached by size+mtime so that a no-op run stays fast
  INPUTS=""
  for t in "${TARS[@]}"; do
    key="$(basename "$t") $(stat -c '%s %Y' "$t")"
    sum=$(grep -F "$key " "$CACHE/spdk-tarball-sums" 2>/dev/null | awk '{print $NF}' | tail -1 || true)
    if [ -z "$sum" ]; then
      sum=$(sha256sum "$t" | awk '{print $1}')
      echo "$key $sum" >> "$CACHE/spdk-tarball-sums"
    fi
    INPUTS="$INPUTS $(basename "$t")=$sum"
  done
  PREFIX=$CACHE/spdk-$VERSION
fi

# fio plugins: the configured fio source tree of the installed fio, which scripts/setup
# prepares just before this step (scripts/lib/fio-source.sh, stamped when configured)
FIO_SRC=$CACHE/fio-src
FIO_STAMP=none
if [ -f "$FIO_SRC/.nvmf-p2p-stamp" ] && [ -f "$FIO_SRC/config-host.h" ]; then
  FIO_STAMP=$(cat "$FIO_SRC/.nvmf-p2p-stamp")
  FIO_NOTE="with the fio plugins (fio source $FIO_SRC)"
else
  FIO_SRC=""
  FIO_NOTE="without the fio plugins (no configured fio source in $CACHE/fio-src: run scripts/setup)"
fi

FLAGS=(--prefix="$PREFIX/build" --with-shared --with-rdma --target-arch=x86-64-v2
       --without-crypto --without-vhost --without-virtio --without-nvme-cuse
       --disable-unit-tests --disable-tests)
if [ -n "$FIO_SRC" ]; then FLAGS+=(--with-fio="$FIO_SRC"); else FLAGS+=(--disable-examples); fi

STAMP=$PREFIX/.nvmf-p2p-stamp
WANT=$(printf 'recipe=%s\ninputs=%s\nflags=%s\nfio=%s\n' "$RECIPE" "${INPUTS# }" "${FLAGS[*]}" "$FIO_STAMP")
# written once ./configure succeeded with these inputs: a later run (after a failed make,
# say) resumes with an incremental make instead of unpacking again
CONFIGURED=$PREFIX/.nvmf-p2p-configured

BINS=(build/bin/spdk_nvme_perf build/bin/spdk_nvme_identify build/bin/nvmf_tgt build/bin/nvme_fuzz)
LIBS=(build/lib/libspdk_nvme.so build/lib/libspdk_env_dpdk.so build/lib/pkgconfig/spdk_nvme.pc
      build/lib/pkgconfig/spdk_env_dpdk.pc build/lib/pkgconfig/spdk_syslibs.pc scripts/rpc.py
      include/spdk/nvme.h)
[ -n "$FIO_SRC" ] && BINS+=(build/fio/spdk_nvme build/fio/spdk_bdev)

installed_ok() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] || return 1
  local f
  for f in "${BINS[@]}" "${LIBS[@]}"; do [ -e "$PREFIX/$f" ] || return 1; done
}

report() {
  echo "$PREFIX" > "$CACHE/spdk-prefix.tmp" && mv "$CACHE/spdk-prefix.tmp" "$CACHE/spdk-prefix"
  log "SPDK $VERSION in $PREFIX ($FIO_NOTE); binaries:"
  local f
  for f in "${BINS[@]}" scripts/rpc.py; do log "  $PREFIX/$f"; done
  log "  environment for scripts: source scripts/lib/spdk-env.sh (SPDK_PREFIX, SPDK_BIN, PKG_CONFIG_PATH)"
}

if installed_ok; then report; exit 0; fi

# ------------------------------------------------------------------ unpack
STEP="SPDK unpack"
rm -f "$CACHE/spdk-prefix"     # nothing points at a tree that is being rebuilt
if [ -f "$CONFIGURED" ] && [ "$(cat "$CONFIGURED")" = "$WANT" ]; then
  log "resuming the SPDK build in $PREFIX $FIO_NOTE (log: $LOG)"
else
  log "building SPDK $VERSION into $PREFIX $FIO_NOTE (log: $LOG; ≈3+ min on 2 cores)"
  rm -rf "$PREFIX"
  mkdir -p "$PREFIX"
  : > "$LOG"
  if [ -n "${NVMF_P2P_SPDK_SRC:-}" ]; then
    cp -a "$SRC/." "$PREFIX/" >>"$LOG" 2>&1 || fail "copying $SRC to $PREFIX failed (see $LOG)"
  else
    tar -xJf "${TARS[0]}" -C "$PREFIX" --strip-components=1 >>"$LOG" 2>&1 || fail "unpacking ${TARS[0]} failed (see $LOG)"
    rm -rf "$PREFIX/dpdk" "$PREFIX/isa-l"
    mkdir -p "$PREFIX/dpdk" "$PREFIX/isa-l"
    tar -xJf "${TARS[1]}" -C "$PREFIX/dpdk" --strip-components=1 >>"$LOG" 2>&1 || fail "unpacking ${TARS[1]} failed (see $LOG)"
    tar -xJf "${TARS[2]}" -C "$PREFIX/isa-l" --strip-components=1 >>"$LOG" 2>&1 || fail "unpacking ${TARS[2]} failed (see $LOG)"
  fi
  dver=$(cat "$PREFIX/dpdk/VERSION" 2>/dev/null || echo unknown)
  case $dver in
    25.11.0|25.11) ;;
    *) fail "DPDK in $PREFIX/dpdk is version $dver; SPDK $VERSION accepts only 25.11.0 (FACTS.md \"SPDK\")" ;;
  esac

  # ------------------------------------------------------------------ configure
  STEP="SPDK configure"
  /usr/bin/python3 -c 'import elftools, jinja2, tabulate' 2>>"$LOG" ||
    fail "/usr/bin/python3 lacks pyelftools, jinja2 or tabulate (Debian packages python3-pyelftools python3-jinja2 python3-tabulate)"
  log "  configure ${FLAGS[*]}"
  ( cd "$PREFIX" && ./configure "${FLAGS[@]}" ) >>"$LOG" 2>&1 ||
    fail "SPDK's ./configure failed (last lines of $LOG: $(tail -3 "$LOG" | tr '\n' ' '))"
  echo "$WANT" > "$CONFIGURED"
fi

# ------------------------------------------------------------------ make
STEP="SPDK make"
JOBS=$(nproc)
log "  make -j$JOBS"
make -C "$PREFIX" -j"$JOBS" >>"$LOG" 2>&1 ||
  fail "SPDK's make failed (see $LOG; last error: $(grep -E 'error|Error' "$LOG" | tail -1))"

STEP="SPDK nvme_fuzz"
log "  make -C test/app/fuzz/nvme_fuzz"
make -C "$PREFIX/test/app/fuzz/nvme_fuzz" -j"$JOBS" >>"$LOG" 2>&1 ||
  fail "building SPDK's test/app/fuzz/nvme_fuzz failed (see $LOG)"
cp -f "$PREFIX/test/app/fuzz/nvme_fuzz/nvme_fuzz" "$PREFIX/build/bin/nvme_fuzz" ||
  fail "copying nvme_fuzz into $PREFIX/build/bin failed"

# ------------------------------------------------------------------ rpath + checks
STEP="SPDK check"
# SPDK's apps find their own .so files through rpath only once installed; point every ELF
# in build/bin and build/fio at the two library directories of this tree.
RPATH="$PREFIX/build/lib:$PREFIX/dpdk/build/lib"
for f in "$PREFIX"/build/bin/* "$PREFIX"/build/fio/*; do
  [ -f "$f" ] && head -c4 "$f" | grep -q ELF || continue
  patchelf --set-rpath "$RPATH" "$f" >>"$LOG" 2>&1 || fail "patchelf --set-rpath failed on $f"
done
for f in "${BINS[@]}" "${LIBS[@]}"; do
  [ -e "$PREFIX/$f" ] || fail "the build finished but $PREFIX/$f is missing (see $LOG)"
done
if ldd "$PREFIX/build/bin/spdk_nvme_perf" | grep -q 'not found'; then
  fail "spdk_nvme_perf does not find its libraries: $(ldd "$PREFIX/build/bin/spdk_nvme_perf" | grep 'not found' | head -2 | tr '\n' ' ')"
fi
"$PREFIX/build/bin/spdk_nvme_perf" -h >>"$LOG" 2>&1 || [ $? -le 1 ] ||
  fail "spdk_nvme_perf does not start (see $LOG)"
echo "$WANT" > "$STAMP"
report
