# shellcheck shell=bash
# Shared by the stages (sourced). Everything runs as root on the build machine.

log() { printf '  %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command in the arm64 root under qemu-user. /proc, /sys, /dev and a /run with the
# build machine's resolver are mounted in a private mount namespace: they vanish with it, also
# when the build is killed, so nothing is ever left mounted.
# Script text for bash -c (in_chroot): its variables expand there, not here.
# shellcheck disable=SC2016
IN_CHROOT_SCRIPT='
set -e
R=$1; shift
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
mkdir -p "$R/run/systemd/resolve" "$R/run/lock"
cp -L /etc/resolv.conf "$R/run/systemd/resolve/stub-resolv.conf"
cp -L /etc/resolv.conf "$R/run/systemd/resolve/resolv.conf"
if [ ! -L "$R/etc/resolv.conf" ]; then
  [ -e "$R/etc/resolv.conf" ] || : >"$R/etc/resolv.conf"
  mount --bind /etc/resolv.conf "$R/etc/resolv.conf"
fi
mount -t tmpfs tmpfs "$R/tmp"
# The CA bundle of the build machine, for pip behind a TLS-inspecting proxy; only for the build, it
# does not go into the image (/tmp is a tmpfs here).
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$R/tmp/build-ca.crt"
  export PIP_CERT=/tmp/build-ca.crt
fi
# A clean environment: nothing of the build machine (pip settings, proxies paths) leaks in.
exec env -i DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 LANG=C.UTF-8 HOME=/root TERM=dumb \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin ${PIP_CERT:+PIP_CERT=$PIP_CERT} \
  ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} \
  chroot "$R" "$@"
'
in_chroot() {
  unshare --mount --propagation private -- /bin/bash -c "$IN_CHROOT_SCRIPT" in_chroot "$ROOTFS" "$@"
}

# Words of a package list file without comments.
package_list() { sed 's/#.*//' "$@" | xargs; }

# The kernel version installed in the root (the newest).
kernel_version() {
  # Kernel version directory names are plain (no blanks, no leading dash).
  # shellcheck disable=SC2012
  ls "$ROOTFS/lib/modules" 2>/dev/null | sort -V | tail -n 1
}
