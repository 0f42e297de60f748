#!/usr/bin/env bash
# scripts/lib/package-check.sh — the Debian package (issue 17 item 4), on the host:
#   1. `cargo deb -p nvmf-p2p` builds it from the binaries scripts/test already built
#      (dev profile, fast compression: a check of the package, not the release build the
#      README describes);
#   2. it holds the binary, the unit, the conffile /etc/nvmf-p2p/target.toml, the
#      modules-load file and the fio engine; `dpkg -x` installs it into a scratch root;
#   3. the installed binary prints the installed example config as its template, and
#      refuses the unedited file naming the PCI device that is not there;
#   4. `systemd-analyze verify --root=SCRATCH nvmf-p2p.service` accepts the unit with no
#      message at all (unknown keys are only warnings there, so any output fails).
# Usage: scripts/lib/package-check.sh [OUTDIR]   (default target/package-check)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$ROOT/target/package-check}
export PATH=$HOME/.cargo/bin:$PATH
fail() { echo "package-check: FAILED: $*" >&2; exit 1; }

command -v cargo-deb >/dev/null || fail "cargo-deb is not installed (scripts/setup installs it)"
command -v systemd-analyze >/dev/null || fail "systemd-analyze is not installed (scripts/setup installs systemd)"
for f in "$ROOT/target/debug/nvmf-p2p" "$ROOT/target/debug/libnvmf_p2p_fio.so"; do
  [ -e "$f" ] || fail "$f is missing: build the workspace first (cargo build --workspace)"
done
rm -rf "$OUT" && mkdir -p "$OUT"
( cd "$ROOT" && cargo deb -q -p nvmf-p2p --no-build --profile dev --fast -o "$OUT/" ) \
  > "$OUT/cargo-deb.log" 2>&1 || { cat "$OUT/cargo-deb.log"; fail "cargo deb"; }
DEB=$(ls "$OUT"/nvmf-p2p_*.deb) || fail "cargo deb wrote no .deb"
echo "built $(basename "$DEB") ($(du -h "$DEB" | cut -f1))"

dpkg-deb -f "$DEB" Package Depends
[ "$(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles)" = /etc/nvmf-p2p/target.toml ] ||
  fail "conffiles is not /etc/nvmf-p2p/target.toml"
SCRATCH=$OUT/root
dpkg -x "$DEB" "$SCRATCH"
for f in usr/bin/nvmf-p2p lib/systemd/system/nvmf-p2p.service etc/nvmf-p2p/target.toml \
         usr/lib/modules-load.d/nvmf-p2p.conf usr/lib/nvmf-p2p/libnvmf_p2p_fio.so \
         usr/share/doc/nvmf-p2p/README.md; do
  [ -e "$SCRATCH/$f" ] || fail "the package has no /$f"
done
echo "installed into $SCRATCH: $(cd "$SCRATCH" && find . -type f | wc -l) files"

BIN=$SCRATCH/usr/bin/nvmf-p2p
"$BIN" serve --print-config | cmp -s - "$SCRATCH/etc/nvmf-p2p/target.toml" ||
  fail "serve --print-config differs from the installed /etc/nvmf-p2p/target.toml"
if msg=$("$BIN" serve --print-config --config "$SCRATCH/etc/nvmf-p2p/target.toml" 2>&1); then
  if [ -e /sys/bus/pci/devices/0000:01:00.0 ]; then echo "(this host has 0000:01:00.0: the example config checks)"
  else fail "the unedited example config was accepted on a host without 0000:01:00.0"; fi
else
  case $msg in *"no PCI device 0000:01:00.0"*) echo "unedited config refused: $msg" ;;
    *) fail "unexpected refusal of the example config: $msg" ;; esac
fi
"$BIN" bind --config "$SCRATCH/etc/nvmf-p2p/target.toml" --help >/dev/null

# systemd-analyze resolves units and commands inside --root: give it the host's units
# and kill(1) (ExecReload), beside what the package installed.
mkdir -p "$SCRATCH/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$SCRATCH/usr/lib/systemd/"
cp /bin/kill "$SCRATCH/usr/bin/kill"
[ -e "$SCRATCH/bin" ] || ln -s usr/bin "$SCRATCH/bin"
if ! out=$(systemd-analyze verify --root="$SCRATCH" nvmf-p2p.service 2>&1) || [ -n "$out" ]; then
  echo "$out"; fail "systemd-analyze verify nvmf-p2p.service"
fi
echo "systemd-analyze verify --root: nvmf-p2p.service accepted"
echo "package-check: ok"
