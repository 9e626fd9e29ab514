#!/bin/bash
# Stage 00: the build machine. Installs the build's own dependencies when missing (Debian
# packages; the arm64 cross compiler and Mosquitto's headers are for the broker plugin) and
# turns on qemu-user for arm64 (binfmt_misc), which a new machine lacks.
set -euo pipefail
# shellcheck source=../lib.sh
. "$IMAGE_DIR/lib.sh"

need=(mmdebstrap qemu-user-static binfmt-support dosfstools mtools fdisk e2fsprogs
      qemu-system-arm zstd xz-utils arch-test ca-certificates util-linux
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross mosquitto-dev libmosquitto-dev)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ! command -v bmaptool >/dev/null; then
  apt-cache show bmap-tools >/dev/null 2>&1 && missing+=(bmap-tools)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
  # The one mount the build makes outside a private namespace: the kernel's binfmt_misc
  # interface (it is a setting of the machine, not a mount of the build's files).
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
  || die "qemu-aarch64 is not registered in binfmt_misc (update-binfmts --enable qemu-aarch64)"
grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
  || die "qemu-aarch64's binfmt entry lacks the F flag (qemu-user-static should set it)"
log "qemu-user for arm64: $(sed -n 's/^interpreter //p' /proc/sys/fs/binfmt_misc/qemu-aarch64)"
log "bmaptool: $(command -v bmaptool || echo 'not available: no .bmap')"
