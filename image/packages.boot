# Boot packages of an image made from Debian (not installed into --base-image, which brings its
# own kernel): Debian's arm64 kernel, its headers for bcc, the Raspberry Pi firmware (the
# raspi-firmware package copies kernel, initramfs and device trees to /boot/firmware).
linux-image-arm64 linux-headers-arm64 raspi-firmware initramfs-tools zstd
