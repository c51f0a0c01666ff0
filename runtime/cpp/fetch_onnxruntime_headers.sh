#!/usr/bin/env bash
# Fetch onnxruntime's C/C++ API headers (Debian trixie's libonnxruntime-dev) into DEST without touching the
# system's apt state: a private sources file derived from the system's own (suite names replaced), private lists,
# cache and archives directories, `apt-get download`, `dpkg -x`. Nothing is installed; the headers are not kept in
# the repository. Usage: fetch_onnxruntime_headers.sh DEST   (DEST/include/onnxruntime/onnxruntime_c_api.h after)
set -euo pipefail
DEST=${1:?usage: $0 DEST}
SUITE_FROM=${GLM_APT_SUITE_FROM:-bookworm}
SUITE_TO=${GLM_APT_SUITE_TO:-trixie}
PACKAGE=${GLM_ORT_HEADERS_PACKAGE:-libonnxruntime-dev}
if [ -f "$DEST/include/onnxruntime/onnxruntime_c_api.h" ]; then
  exit 0  # cached
fi
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK="$DEST/apt"
rm -rf "$WORK"
mkdir -p "$WORK/sources" "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/pkg"
# The system's sources, deb822 (.sources) or one-line (.list) format, with the release suite renamed.
found=0
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  sed -e "s/\b${SUITE_FROM}\b/${SUITE_TO}/g" "$f" > "$WORK/sources/$(basename "$f")"
  found=1
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] || continue
  grep -E '^\s*deb\s' "$f" | sed -e "s/\b${SUITE_FROM}\b/${SUITE_TO}/g" > "$WORK/sources/$(basename "$f").list" || true
  [ -s "$WORK/sources/$(basename "$f").list" ] && found=1
done
if [ "$found" = 0 ]; then
  echo "fetch_onnxruntime_headers: no apt sources found under /etc/apt to derive a $SUITE_TO source from" >&2
  exit 1
fi
APT=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$WORK/sources"
     -o Dir::State::Lists="$WORK/lists" -o Dir::Cache="$WORK/cache" -o Dir::Cache::archives="$WORK/cache/archives"
     -o Dir::State::status=/dev/null -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${APT[@]}" -q update >"$WORK/update.log" 2>&1 || { cat "$WORK/update.log" >&2; exit 1; }
(cd "$WORK/pkg" && apt-get "${APT[@]}" -q download "$PACKAGE" >"$WORK/download.log" 2>&1) \
  || { cat "$WORK/download.log" >&2; exit 1; }
deb=$(ls "$WORK/pkg"/*.deb | head -n1)
dpkg -x "$deb" "$WORK/root"
hdr=$(dirname "$(find "$WORK/root" -name onnxruntime_c_api.h | head -n1)")
if [ ! -f "$hdr/onnxruntime_c_api.h" ]; then
  echo "fetch_onnxruntime_headers: $deb has no onnxruntime_c_api.h" >&2
  exit 1
fi
mkdir -p "$DEST/include"
rm -rf "$DEST/include/onnxruntime"
cp -r "$hdr" "$DEST/include/onnxruntime"
basename "$deb" > "$DEST/include/onnxruntime/SOURCE_PACKAGE"
rm -rf "$WORK"
echo "onnxruntime headers from $(cat "$DEST/include/onnxruntime/SOURCE_PACKAGE") in $DEST/include/onnxruntime"
