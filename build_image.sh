#!/usr/bin/env bash
# Builds the flashable Kalki SD-card image for 64-bit Raspberry Pi boards (issue 5).
# The recipe is in image/ (settings in image/config, stages in image/stages/, files in
# image/files/); this script only orchestrates: it runs each stage, prints it with its time,
# fails naming the stage (its log is in $WORK/logs/), and cleans up on failure or Ctrl-C.
set -euo pipefail

REPO=$(cd "$(dirname "$0")" && pwd)
IMAGE_DIR=$REPO/image

usage() {
  cat <<EOF
usage: ./build_image.sh [--out DIR] [--base-image FILE] [--work DIR] [--from STAGE] [--help]

Builds out/kalki-pi-arm64-<date>-<version>.img.xz (plus .bmap when bmaptool is at hand, a
.sha256 and a .manifest.txt with the image's sha256 and every package version) for 64-bit
Raspberry Pi boards (Pi 3, Pi 4, Zero 2 W; see docs/image.md). Runs as root; installs
its own build dependencies (Debian packages) when missing.

  --out DIR          where the image goes (default: ./out)
  --base-image FILE  install the appliance into an existing Raspberry Pi image (Raspberry Pi OS
                     Lite, or one this script made; .img, .img.xz or .img.zst) instead of
                     building Debian bookworm arm64 from Debian's archive
  --work DIR         working directory (default: /tmp/kalki-image; about 5 GB)
  --from STAGE       start at stage STAGE (e.g. 30) reusing the work directory of an earlier run
  --help             this text

Stages (image/stages/): $(cd "$IMAGE_DIR/stages" && printf '%s\n' *.sh | sed 's/\.sh$//' | xargs)
Settings: image/config (each can be overridden from the environment).
EOF
}

OUT_ARG="" BASE_ARG="" WORK_ARG="" FROM=0
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --out) OUT_ARG=${2:?--out needs a directory}; shift 2 ;;
    --out=*) OUT_ARG=${1#*=}; shift ;;
    --base-image) BASE_ARG=${2:?--base-image needs a file}; shift 2 ;;
    --base-image=*) BASE_ARG=${1#*=}; shift ;;
    --work) WORK_ARG=${2:?--work needs a directory}; shift 2 ;;
    --work=*) WORK_ARG=${1#*=}; shift ;;
    --from) FROM=${2:?--from needs a stage number}; shift 2 ;;
    --from=*) FROM=${1#*=}; shift ;;
    *) echo "build_image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "build_image.sh: must run as root (mmdebstrap, chroot, binfmt_misc)" >&2; exit 2; }

set -a
# shellcheck source=image/config
. "$IMAGE_DIR/config"
set +a
[ -n "$WORK_ARG" ] && WORK=$WORK_ARG
OUT=$(mkdir -p "${OUT_ARG:-$REPO/out}" && cd "${OUT_ARG:-$REPO/out}" && pwd)
BASE_IMAGE=""
if [ -n "$BASE_ARG" ]; then
  [ -r "$BASE_ARG" ] || { echo "build_image.sh: --base-image $BASE_ARG: no such file" >&2; exit 2; }
  BASE_IMAGE=$(cd "$(dirname "$BASE_ARG")" && pwd)/$(basename "$BASE_ARG")
fi
case $WORK in /|/tmp|/var/tmp|"$REPO"|"$HOME") echo "build_image.sh: refusing --work $WORK" >&2; exit 2 ;; esac
ROOTFS=$WORK/rootfs
LOGS=$WORK/logs
if [ "$FROM" = 0 ]; then
  rm -rf "$WORK"
fi
mkdir -p "$WORK" "$LOGS"
# The disk identifier (PARTUUIDs are <id>-01..03): fixed for one build, kept for --from.
[ -s "$WORK/disk-id" ] || od -An -N4 -tx4 /dev/urandom | tr -d ' \n' >"$WORK/disk-id"
DISK_ID=$(cat "$WORK/disk-id")
version=$(git -C "$REPO" describe --always --dirty --tags 2>/dev/null || echo unknown)
IMAGE_VERSION=${IMAGE_VERSION:-$(date -u +%Y%m%d)-$version}
export REPO IMAGE_DIR WORK ROOTFS OUT BASE_IMAGE DISK_ID IMAGE_VERSION

# Cleanup, also on failure and Ctrl-C: the stages mount only inside private mount namespaces,
# so nothing should be left; this checks, and removes anything under $WORK that is.
stage_pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$stage_pid" ] && kill -0 "$stage_pid" 2>/dev/null; then
    kill -TERM -- -"$stage_pid" 2>/dev/null || kill -TERM "$stage_pid" 2>/dev/null || true
    wait "$stage_pid" 2>/dev/null || true
  fi
  local m
  # Mount points in /proc/mounts have no blanks (they are escaped as \040): one word a line.
  # shellcheck disable=SC2013
  for m in $(awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
    echo "build_image.sh: unmounting leftover $m" >&2
    umount -l "$m" || true
  done
  local dev
  for dev in $(losetup -n -O NAME,BACK-FILE 2>/dev/null | awk -v w="$WORK" 'index($2, w) == 1 || ($2 == b && b != "") {print $1}' b="${BASE_IMAGE:-}"); do
    echo "build_image.sh: detaching leftover $dev" >&2
    losetup -d "$dev" || true
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "build_image.sh: interrupted" >&2; exit 130' INT TERM

fmt() { printf '%dm%02ds' $(( $1 / 60 )) $(( $1 % 60 )); }
echo "Kalki SD-card image $IMAGE_NAME-$IMAGE_VERSION"
echo "  base: ${BASE_IMAGE:-Debian $SUITE arm64 from $MIRROR}; work: $WORK; out: $OUT"
t_build=$(date +%s)
for stage in "$IMAGE_DIR"/stages/[0-9][0-9]-*.sh; do
  name=$(basename "$stage" .sh)
  num=${name%%-*}
  [ "$((10#$num))" -ge "$((10#$FROM))" ] || continue
  log=$LOGS/$name.log
  echo "[$name] ..."
  t0=$(date +%s)
  # Its own process group (set -m), so an interrupt ends everything the stage started.
  set -m
  ( set -o pipefail; bash "$stage" 2>&1 | tee "$log" | { grep --line-buffered -E '^(  |error:|E: )' || true; } ) &
  stage_pid=$!
  set +m
  rc=0
  wait "$stage_pid" || rc=$?
  stage_pid=""
  dt=$(( $(date +%s) - t0 ))
  if [ $rc -ne 0 ]; then
    echo "[$name] FAILED after $(fmt $dt) (exit $rc); the end of $log:" >&2
    tail -n 25 "$log" | sed 's/^/    /' >&2
    echo "build_image.sh: stage $name failed" >&2
    exit 1
  fi
  echo "[$name] done in $(fmt $dt)"
  echo "$name $dt" >>"$LOGS/times"
done
total=$(( $(date +%s) - t_build ))
echo "Built in $(fmt $total):"
# A listing for the reader, not parsed.
# shellcheck disable=SC2012
ls -l "$OUT/$IMAGE_NAME-$IMAGE_VERSION".* | sed 's/^/  /'
