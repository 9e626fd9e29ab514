#!/bin/bash
# Stage 60: the disk image, assembled without loop devices or mounts: each partition is made as
# a file (mkfs.vfat -C + mcopy for the firmware, mke2fs -d for root and data), the MBR with
# sfdisk, and the partitions copied in with dd (sparse).
#   1 firmware  FAT32  $FIRMWARE_MB MiB       /boot/firmware (kernel, initramfs, DTBs, kalki.toml)
#   2 root      ext4   content + $ROOT_FREE_MB MiB   /   (can be mounted read-only)
#   3 data      ext4   $DATA_MB MiB, grown at first boot   /var/lib/kalki
set -euo pipefail
# shellcheck source=../lib.sh
. "$IMAGE_DIR/lib.sh"

parts="$WORK/parts"
rm -rf "$parts"; mkdir -p "$parts"
img="$WORK/image.img"
rm -f "$img"

# The root partition holds empty mount points for the other two: their contents move aside
# while mke2fs reads the tree (and come back also when this stage fails).
fw_dir="$WORK/firmware-tree"; data_dir="$WORK/data-tree"
rm -rf "$fw_dir" "$data_dir"
restore() {
  if [ -d "$fw_dir" ]; then rm -rf "$ROOTFS/boot/firmware"; mv "$fw_dir" "$ROOTFS/boot/firmware"; fi
  if [ -d "$data_dir" ]; then rm -rf "$ROOTFS/var/lib/kalki"; mv "$data_dir" "$ROOTFS/var/lib/kalki"; fi
}
trap restore EXIT
mv "$ROOTFS/boot/firmware" "$fw_dir"; install -d -m 0755 "$ROOTFS/boot/firmware"
mv "$ROOTFS/var/lib/kalki" "$data_dir"; install -d -m 0755 "$ROOTFS/var/lib/kalki"
# No resolver or build leftovers in the image.
rm -rf "$ROOTFS/var/cache/apt/archives/"*.deb "$ROOTFS/var/lib/apt/lists/"* "$ROOTFS/root/.cache" \
       "$ROOTFS/tmp/"* "$ROOTFS/var/tmp/"*

# -- firmware (FAT32) --
fw_kb=$(( FIRMWARE_MB * 1024 ))
used_kb=$(du -sk "$fw_dir" | cut -f1)
[ "$used_kb" -lt $(( fw_kb - 8192 )) ] || die "firmware files ($used_kb KiB) do not fit $FIRMWARE_MB MiB"
mkfs.vfat -C -F 32 -n KALKI-FW "$parts/firmware.img" "$fw_kb" >/dev/null
if [ -n "$(ls -A "$fw_dir")" ]; then
  mcopy -s -p -m -i "$parts/firmware.img" "$fw_dir"/* ::/
fi
# A count for the log.
# shellcheck disable=SC2012
log "firmware: $(ls "$fw_dir" | wc -l) files, $(( used_kb / 1024 )) MiB used of $FIRMWARE_MB MiB"

# -- root (ext4) --
content_mb=$(( $(du -sk --apparent-size "$ROOTFS" | cut -f1) / 1024 ))
files=$(find "$ROOTFS" -xdev | wc -l)
root_mb=$(( (content_mb * 115 / 100 + ROOT_FREE_MB + 3) / 4 * 4 ))
mke2fs -q -F -t ext4 -L kalki-root -N $(( files * 2 + 65536 )) -d "$ROOTFS" "$parts/root.img" "${root_mb}M"
e2fsck -fn "$parts/root.img" >/dev/null 2>&1 || die "the root file system does not check clean"
log "root: $content_mb MiB content, $files files, partition $root_mb MiB"

# -- data (ext4, grown at first boot) --
mke2fs -q -F -t ext4 -L kalki-data -d "$data_dir" "$parts/data.img" "${DATA_MB}M"
trap - EXIT
restore

# -- the MBR and the partitions, 4 MiB aligned --
align=8192                                           # sectors: 4 MiB
fw_start=$align;                  fw_size=$(( FIRMWARE_MB * 2048 ))
root_start=$(( fw_start + fw_size )); root_size=$(( root_mb * 2048 ))
data_start=$(( root_start + root_size )); data_size=$(( DATA_MB * 2048 ))
total=$(( data_start + data_size ))
truncate -s $(( total * 512 )) "$img"
sfdisk -q "$img" <<SFDISK
label: dos
label-id: 0x$DISK_ID
unit: sectors

start=$fw_start, size=$fw_size, type=c, bootable
start=$root_start, size=$root_size, type=83
start=$data_start, size=$data_size, type=83
SFDISK
for p in firmware:$fw_start root:$root_start data:$data_start; do
  dd if="$parts/${p%%:*}.img" of="$img" bs=1M seek=$(( ${p#*:} / 2048 )) conv=notrunc,sparse status=none
done
rm -rf "$parts"
log "image: $(( total / 2048 )) MiB, disk id 0x$DISK_ID"
sfdisk -l "$img" | sed 's/^/    /'
