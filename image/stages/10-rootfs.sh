#!/bin/bash
# Stage 10: the arm64 root file system in $ROOTFS.
#  - from Debian: mmdebstrap --arch=arm64 (qemu-user) with packages.boot and packages, the way
#    Debian's own Raspberry Pi images are made (raspi-firmware, linux-image-arm64);
#  - with --base-image FILE: an existing Raspberry Pi image (Raspberry Pi OS Lite, or one this
#    build made): its root partition is loop-mounted read-only in a private mount namespace and
#    copied, its FAT partition is read with mtools, then packages are installed with apt-get in
#    a chroot under qemu-user.
# In both, update-initramfs is diverted to a no-op while packages are installed: stage 40
# generates the initramfs once (under emulation each generation takes minutes).
set -euo pipefail
# shellcheck source=../lib.sh
. "$IMAGE_DIR/lib.sh"

rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"


if [ -z "${BASE_IMAGE:-}" ]; then
  packages="$(package_list "$IMAGE_DIR/packages.boot" "$IMAGE_DIR/packages")"
  read -r -a comps <<<"$COMPONENTS"
  log "mmdebstrap $SUITE arm64 from $MIRROR ($(wc -w <<<"$packages") packages)"
  mmdebstrap --mode=unshare --arch=arm64 --variant=minbase \
    --components="$(IFS=,; echo "${comps[*]}")" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --include="$(tr ' ' ',' <<<"$packages")" \
    --essential-hook="$IMAGE_DIR/hooks/divert-initramfs" \
    "$SUITE" "$ROOTFS" \
    "deb $MIRROR $SUITE $COMPONENTS" \
    "deb $MIRROR $SUITE-updates $COMPONENTS" \
    "deb $SECURITY_MIRROR $SUITE-security $COMPONENTS"
  exit 0
fi

# -- --base-image ------------------------------------------------------------------------------
base=$BASE_IMAGE
case $base in
  *.xz) log "decompressing $base"; xz -dc -T0 "$base" >"$WORK/base.img"; base=$WORK/base.img ;;
  *.zst) zstd -dc "$base" >"$WORK/base.img"; base=$WORK/base.img ;;
esac
# The partition table (MBR): the first FAT partition is the firmware, the first Linux one root.
# fat_size: read for its place in the line, not used (mcopy needs only the offset).
# shellcheck disable=SC2034
read -r fat_start fat_size root_start root_size < <(sfdisk -J "$base" | python3 -c '
import json, sys
parts = json.load(sys.stdin)["partitiontable"]["partitions"]
fat = next(p for p in parts if p["type"].lower() in ("b", "c", "e", "ef"))
root = next(p for p in parts if p["type"].lower() == "83")
print(fat["start"], fat["size"], root["start"], root["size"])')
log "base image $BASE_IMAGE: firmware at sector $fat_start, root at sector $root_start"
# Loop device with the partition's offset, read-only, autocleared when unmounted; the mount is
# in a private namespace, so it disappears with the process even on Ctrl-C.
# Script text for bash -c: its $1..$5 expand there, not here.
# shellcheck disable=SC2016
unshare --mount --propagation private -- /bin/bash -c '
set -e
mkdir -p "$3"
mount -o ro,loop,offset=$(( $2 * 512 )),sizelimit=$(( $4 * 512 )) "$1" "$3"
tar -C "$3" --numeric-owner --xattrs --xattrs-include="*" --acls -cf - . \
  | tar -C "$5" --numeric-owner --xattrs --xattrs-include="*" --acls -xpf -
' base-root "$base" "$root_start" "$WORK/base-mnt" "$root_size" "$ROOTFS"
rmdir "$WORK/base-mnt" 2>/dev/null || true
mkdir -p "$ROOTFS/boot/firmware"
find "$ROOTFS/boot/firmware" -mindepth 1 -delete
mcopy -s -p -n -i "$base@@$(( fat_start * 512 ))" '::*' "$ROOTFS/boot/firmware/"
# A count for the log.
# shellcheck disable=SC2012
log "base root: $(du -sh "$ROOTFS" | cut -f1), firmware: $(ls "$ROOTFS/boot/firmware" | wc -l) files"

# The appliance's packages (not the boot ones: the base brings its kernel and firmware), and the
# headers of the base's kernel for bcc.
# '${Status}' is dpkg-query's format field, not a shell expansion.
# shellcheck disable=SC2016
if chroot "$ROOTFS" dpkg-query -W -f='${Status}' linux-image-arm64 2>/dev/null | grep -q 'ok installed'; then
  headers=linux-headers-arm64                               # Debian's kernel (an image of ours)
elif chroot "$ROOTFS" dpkg-query -W -f='${Status}' linux-image-rpi-v8 2>/dev/null | grep -q 'ok installed'; then
  headers="linux-headers-rpi-v8"                            # Raspberry Pi OS bookworm
  chroot "$ROOTFS" dpkg-query -W -f='${Status}' linux-image-rpi-2712 2>/dev/null | grep -q 'ok installed' \
    && headers="$headers linux-headers-rpi-2712"
elif chroot "$ROOTFS" dpkg-query -W -f='${Status}' raspberrypi-kernel 2>/dev/null | grep -q 'ok installed'; then
  headers=raspberrypi-kernel-headers                        # Raspberry Pi OS bullseye
else
  die "the base image has no kernel package this build knows (linux-image-arm64, linux-image-rpi-v8, raspberrypi-kernel)"
fi
[ -e "$ROOTFS/usr/sbin/update-initramfs.distrib" ] || "$IMAGE_DIR/hooks/divert-initramfs" "$ROOTFS"
packages="$(package_list "$IMAGE_DIR/packages") $headers"
log "apt-get install into the base: $(wc -w <<<"$packages") packages (headers: $headers)"
in_chroot apt-get update -q || log "apt-get update reported errors (unreachable archives are skipped)"
# $packages is a list of words: split on purpose.
# shellcheck disable=SC2086
in_chroot apt-get install -y -q --no-install-recommends $packages
in_chroot apt-get clean
