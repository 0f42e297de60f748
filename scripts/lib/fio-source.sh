# scripts/lib/fio-source.sh — sourced by scripts/setup (uses its log, fail, mirror, CACHE).
#
# fio_source_tree: the Debian source of the *installed* fio version, unpacked with its Debian
# patches into $FIO_SRC (= ${XDG_CACHE_HOME:-$HOME/.cache}/nvmf-p2p/fio-src) and configured
# once with `./configure --disable-native` (so config-host.h exists; native would emit
# AVX-512 the TCG guest lacks, FACTS.md "Build and runtime gotchas"). Debian ships no fio
# headers; the fio engine (fio-plugin/build.rs) and SPDK's fio plugins build against this
# tree (FACTS.md "fio external engines").
#
# The source is fetched through a private deb-src list (Dir::Etc::SourceList,
# Dir::State::Lists, Dir::Cache under $CACHE/apt-src): the system's apt configuration and
# caches are untouched. Idempotent: $FIO_SRC/.nvmf-p2p-stamp records the fio version and
# the configure line; a matching stamp makes this a no-op.
FIO_SRC=$CACHE/fio-src
export FIO_SRC

fio_source_tree() {
  local ver src suite dir stamp want dsc tmp
  ver=$(dpkg-query -W -f='${Version}' fio 2>/dev/null) || fail "fio is not installed (step 1 installs it)"
  src=$(dpkg-query -W -f='${source:Package}' fio)
  want="fio $ver ./configure --disable-native"
  stamp=$FIO_SRC/.nvmf-p2p-stamp
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$FIO_SRC/config-host.h" ]; then
    log "fio source: $ver configured in $FIO_SRC"
    return 0
  fi
  # the installed version comes from this release's suites
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ -n "$suite" ] || fail "no VERSION_CODENAME in /etc/os-release: cannot name the Debian suite of fio's source"
  dir=$CACHE/apt-src
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  cat > "$dir/src.sources" <<SRC
Types: deb-src
URIs: $(mirror)
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  local APT=(-o Dir::Etc::SourceList="$dir/src.sources" -o Dir::Etc::SourceParts=/nonexistent
             -o Dir::State::Lists="$dir/lists" -o Dir::Cache="$dir/cache"
             -o Dir::State::status=/var/lib/dpkg/status)
  log "fio source: reading the deb-src index of $suite (private source list $dir/src.sources)"
  apt-get "${APT[@]}" -q update >"$dir/update.log" 2>&1 ||
    fail "apt-get update of the private deb-src list failed (see $dir/update.log)"
  rm -rf "$dir/dl"; mkdir -p "$dir/dl"
  log "fio source: downloading $src $ver"
  ( cd "$dir/dl" && apt-get "${APT[@]}" -q source --download-only "$src=$ver" ) >"$dir/download.log" 2>&1 ||
    fail "apt-get source $src=$ver failed (see $dir/download.log; is $ver still in $suite?)"
  dsc=$(ls "$dir"/dl/*.dsc 2>/dev/null | head -1)
  [ -n "$dsc" ] || fail "no .dsc downloaded for $src $ver (see $dir/download.log)"
  # apt-get has checked the files against the signed index; dpkg-source applies the patches
  tmp=$CACHE/fio-src.tmp
  rm -rf "$tmp"
  dpkg-source --no-check -x "$dsc" "$tmp" >"$dir/unpack.log" 2>&1 ||
    fail "dpkg-source -x $dsc failed (see $dir/unpack.log)"
  rm -rf "$FIO_SRC" && mv "$tmp" "$FIO_SRC"
  log "fio source: ./configure --disable-native in $FIO_SRC"
  ( cd "$FIO_SRC" && ./configure --disable-native ) >"$dir/configure.log" 2>&1 ||
    fail "fio's ./configure failed (see $dir/configure.log)"
  [ -f "$FIO_SRC/config-host.h" ] || fail "fio's ./configure wrote no config-host.h (see $dir/configure.log)"
  echo "$want" > "$stamp"
  rm -rf "$dir/dl"
  log "fio source: $ver configured in $FIO_SRC"
}
