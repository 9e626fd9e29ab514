#!/bin/bash
# Stage 20: the system around the appliance. Copies image/files/rootfs/ over the root (units,
# scripts, configuration), writes fstab and the firmware's boot settings for this image's
# partitions, enables the appliance's units, masks the services they replace, and removes what
# must be unique per card (SSH host keys, machine-id).
set -euo pipefail
# shellcheck source=../lib.sh
. "$IMAGE_DIR/lib.sh"

cp -a --no-preserve=ownership "$IMAGE_DIR/files/rootfs/." "$ROOTFS/"
install -d -m 0755 "$ROOTFS/boot/firmware" "$ROOTFS/var/lib/kalki" "$ROOTFS/etc/kalki"
install -m 0644 "$IMAGE_DIR/files/boot/kalki.toml.example" "$ROOTFS/boot/firmware/kalki.toml.example"

# Partitions by PARTUUID (the disk identifier is set by stage 60): works with and without an
# initramfs (Raspberry Pi OS kernels have none) and on qemu's virtio disk alike.
cat >"$ROOTFS/etc/fstab" <<FSTAB
# Kalki SD card: firmware (FAT), root (ext4, may be mounted read-only), data (ext4, grown at
# first boot; everything the appliance writes).
PARTUUID=${DISK_ID}-02  /               ext4  defaults,noatime,errors=remount-ro  0 1
PARTUUID=${DISK_ID}-01  /boot/firmware  vfat  defaults,noatime,umask=0077,nofail   0 2
PARTUUID=${DISK_ID}-03  /var/lib/kalki  ext4  defaults,noatime,nofail              0 2
FSTAB

if [ -e "$ROOTFS/etc/kernel/postinst.d/z50-raspi-firmware" ]; then
  # Debian's raspi-firmware writes config.txt and cmdline.txt whenever the kernel or the
  # initramfs changes (stage 40, and apt upgrades on the Pi) from these settings.
  sed -i '/^ROOTPART=/d;/^CONSOLES=/d' "$ROOTFS/etc/default/raspi-firmware"
  cat >>"$ROOTFS/etc/default/raspi-firmware" <<RPI
# Kalki: root by PARTUUID; boot messages on the serial console (GPIO 14/15), a login on HDMI.
ROOTPART="PARTUUID=${DISK_ID}-02"
CONSOLES="tty0 ttyS1,115200"
RPI
  # The firmware's own settings: no rainbow splash; the Wi-Fi and Bluetooth stay as they are.
  printf '%s\n' "disable_splash=1" >"$ROOTFS/etc/default/raspi-firmware-custom"
  # raspi-firmware writes net.ifnames=0 and fsck.repair=yes itself; the rest is extra.
  extra=""
  for arg in $KERNEL_CMDLINE_EXTRA; do
    case $arg in net.ifnames=0|fsck.repair=yes) ;; *) extra="$extra $arg" ;; esac
  done
  if [ -n "$extra" ]; then printf '%s\n' "${extra# }" >"$ROOTFS/etc/default/raspi-extra-cmdline"
  else rm -f "$ROOTFS/etc/default/raspi-extra-cmdline"; fi
fi
# A base image's firmware partition: root points at this image's root partition.
if [ -e "$ROOTFS/boot/firmware/cmdline.txt" ]; then
  sed -i -E "s#root=[^ ]+#root=PARTUUID=${DISK_ID}-02#" "$ROOTFS/boot/firmware/cmdline.txt"
  for arg in $KERNEL_CMDLINE_EXTRA; do
    grep -qw -- "$arg" "$ROOTFS/boot/firmware/cmdline.txt" || sed -i "1s#\$# $arg#" "$ROOTFS/boot/firmware/cmdline.txt"
  done
fi

echo kalki >"$ROOTFS/etc/hostname"
cat >"$ROOTFS/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	kalki
::1		localhost ip6-localhost ip6-loopback
HOSTS
# The supervisor's configuration is rendered from the site settings at every boot (kalki-site).
ln -sfn /run/kalki/site/kalki.toml "$ROOTFS/etc/kalki/kalki.toml"
ln -sfn /run/systemd/resolve/stub-resolv.conf "$ROOTFS/etc/resolv.conf"

# Unique per card: made at first boot.
rm -f "$ROOTFS"/etc/ssh/ssh_host_*
: >"$ROOTFS/etc/machine-id"
rm -f "$ROOTFS/var/lib/dbus/machine-id"

# Units: the appliance's on; the Debian services they replace masked (kalki-* run them from
# the rendered configuration, or not at all when the site settings are in error).
units_on="kalki-firewall.service kalki-site.service kalki-firstboot.service kalki.service
  kalki-gate.service kalki-mosquitto.service kalki-dnsmasq.service kalki-hostapd.service kalki-watchdog.timer
  systemd-networkd.service systemd-resolved.service systemd-timesyncd.service ssh.service"
units_masked="mosquitto.service dnsmasq.service hostapd.service nftables.service
  networking.service wpa_supplicant.service"
# $units_on is a list of words: split on purpose.
# shellcheck disable=SC2086
in_chroot systemctl enable $units_on
for u in $units_masked; do
  # mask only what is installed (a base image may lack some)
  if [ -e "$ROOTFS/lib/systemd/system/$u" ] || [ -e "$ROOTFS/usr/lib/systemd/system/$u" ]; then
    in_chroot systemctl mask "$u"
  fi
done
# Raspberry Pi OS: its own first-boot resizer and network managers would fight ours.
for u in NetworkManager.service dhcpcd.service userconfig.service rpi-resizefs.service; do
  if [ -e "$ROOTFS/lib/systemd/system/$u" ] || [ -e "$ROOTFS/usr/lib/systemd/system/$u" ]; then
    in_chroot systemctl disable "$u" || true
  fi
done
sed -i 's# init=/usr/lib/raspberrypi-sys-mods/firstboot##; s# init=/usr/lib/raspi-config/init_resize.sh##' \
  "$ROOTFS/boot/firmware/cmdline.txt" 2>/dev/null || true

# A root password nobody knows: logins are by SSH key (site settings) only.
in_chroot passwd -l root >/dev/null
log "units enabled: $(wc -w <<<"$units_on"), masked: $(wc -w <<<"$units_masked")"
