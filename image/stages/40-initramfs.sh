#!/bin/bash
# Stage 40: the initramfs, generated once (stage 10 deferred every request for one). Its
# post-update hook from raspi-firmware then copies kernel, initramfs and device trees to
# /boot/firmware and writes config.txt and cmdline.txt (settings from stage 20).
# A base image that brings its own kernel keeps its boot files; an initramfs is made only when
# the image's kernel is Debian's and has none yet.
set -euo pipefail
# shellcheck source=../lib.sh
. "$IMAGE_DIR/lib.sh"

if [ -e "$ROOTFS/usr/sbin/update-initramfs.distrib" ]; then
  rm -f "$ROOTFS/usr/sbin/update-initramfs"
  in_chroot dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs
fi
version=$(kernel_version)
[ -n "$version" ] || die "no kernel under /lib/modules"
[ -e "$ROOTFS/lib/modules/$version/build/include" ] || [ -e "$ROOTFS/usr/src/linux-headers-$version/include" ] \
  || die "no kernel headers for $version: bcc could not compile the data path"

if [ -e "$ROOTFS/boot/vmlinuz-$version" ] && [ -x "$ROOTFS/usr/sbin/update-initramfs" ]; then
  if [ ! -e "$ROOTFS/boot/initrd.img-$version" ]; then
    log "generating the initramfs for $version (MODULES=list)"
    in_chroot update-initramfs -c -k "$version"
  else
    log "initramfs for $version exists; refreshing /boot/firmware"
    in_chroot env DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware "$version" /boot/vmlinuz-"$version" 2>/dev/null || true
  fi
fi
# A count for the log.
# shellcheck disable=SC2012
log "kernel $version; /boot/firmware: $(ls "$ROOTFS/boot/firmware" | wc -l) files, $(du -sh "$ROOTFS/boot/firmware" | cut -f1)"
[ -e "$ROOTFS/boot/firmware/cmdline.txt" ] && log "cmdline.txt: $(cat "$ROOTFS/boot/firmware/cmdline.txt")"
true
