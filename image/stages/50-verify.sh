#!/bin/bash
# Stage 50: the image is checked before it is assembled, in the arm64 root under qemu-user:
# the appliance imports (with bcc's and nftables' bindings), its configuration defaults print,
# the profiles validate, the example site file renders into a valid supervisor configuration,
# the units are enabled, the kernel headers match the kernel, nothing per-card is in the image.
# (nftables and bpf() do not work under qemu-user: the boot test checks those.)
set -euo pipefail
# shellcheck source=../lib.sh
. "$IMAGE_DIR/lib.sh"

version=$(kernel_version)
in_chroot /opt/kalki/.venv/bin/python - "$version" <<'PY'
import importlib, pathlib, sys, tomllib, tempfile
version = sys.argv[1]
root = pathlib.Path("/opt/kalki")
mods = sorted(".".join(p.relative_to(root).with_suffix("").parts) for p in (root / "appliance").rglob("*.py")
              if p.stem not in ("__init__", "__main__"))
for name in mods + ["bcc", "nftables", "pyroute2", "paho.mqtt.client", "tinydb", "gpiozero"]:
    importlib.import_module(name)
print(f"  imported {len(mods)} appliance modules, bcc, nftables, pyroute2, paho-mqtt, tinydb, gpiozero")
from appliance import config
from appliance.policy import profiles
from appliance.system import site
assert "[gateway]" in config.defaults_toml()
loaded = profiles.load_all(pathlib.Path(site.PROFILES))
print(f"  profiles valid: {', '.join(sorted(loaded))}")
example = pathlib.Path("/boot/firmware/kalki.toml.example").read_text()
try:
    site.parse(tomllib.loads(example), "kalki.toml.example")
    raise SystemExit("the example's placeholder passphrase was accepted")
except site.SiteError as e:
    assert "placeholder" in str(e), e
s = site.parse(tomllib.loads(example.replace(site.PLACEHOLDER_PASSPHRASE, "image-build-check")), "example")
with tempfile.TemporaryDirectory() as d:
    out = pathlib.Path(d) / "site"
    src = pathlib.Path(d) / "kalki.toml"
    src.write_text(example.replace(site.PLACEHOLDER_PASSPHRASE, "image-build-check"))
    ok, msg = site.apply(src, out, pathlib.Path(d) / "err")
    assert ok, msg
    cfg = config.load(out / "kalki.toml")
    assert cfg.state.directory == "/var/lib/kalki"
print("  site example renders a valid supervisor configuration, hostapd.conf and dnsmasq.conf")
build = pathlib.Path(f"/lib/modules/{version}/build")
assert (build / "include").exists() or (pathlib.Path(f"/usr/src/linux-headers-{version}") / "include").exists(), \
    f"no headers for {version}"
print(f"  kernel headers for {version}: {build.resolve()}")
PY
in_chroot /opt/kalki/.venv/bin/kalki config defaults >/dev/null
for u in kalki-firewall.service kalki-site.service kalki-firstboot.service kalki.service \
         kalki-gate.service kalki-mosquitto.service kalki-dnsmasq.service kalki-hostapd.service kalki-watchdog.timer \
         systemd-networkd.service ssh.service; do
  state=$(in_chroot systemctl is-enabled "$u" 2>/dev/null || true)
  [ "$state" = enabled ] || die "unit $u is $state, not enabled"
done
for u in mosquitto.service dnsmasq.service hostapd.service; do
  state=$(in_chroot systemctl is-enabled "$u" 2>/dev/null || true)
  [ "$state" = masked ] || die "unit $u is $state, not masked"
done
log "units enabled and masked as intended"
for f in /usr/sbin/nft /usr/sbin/mosquitto /usr/sbin/dnsmasq /usr/sbin/hostapd /usr/bin/growpart \
         /usr/sbin/resize2fs /usr/bin/openssl /usr/bin/ssh-keygen; do
  [ -x "$ROOTFS$f" ] || die "$f is missing from the image"
done
plugin="$ROOTFS/opt/kalki/build/kalki_denials.so"
# ELF e_machine, bytes 18-19: 0xb7 is AArch64
[ "$(od -An -tx1 -j18 -N2 "$plugin" 2>/dev/null | tr -d ' ')" = b700 ] \
  || die "the broker plugin $plugin is missing or not built for arm64"
! ls "$ROOTFS"/etc/ssh/ssh_host_* >/dev/null 2>&1 || die "SSH host keys in the image"
[ ! -s "$ROOTFS/etc/machine-id" ] || die "a machine-id in the image"
for f in cmdline.txt config.txt; do
  [ -e "$ROOTFS/boot/firmware/$f" ] || die "/boot/firmware/$f is missing"
done
if [ -e "$ROOTFS/boot/vmlinuz-$version" ]; then
  [ -e "$ROOTFS/boot/initrd.img-$version" ] || die "no initramfs for $version"
  for f in "vmlinuz-$version" "initrd.img-$version" bcm2837-rpi-3-b.dtb bcm2711-rpi-4-b.dtb bcm2837-rpi-zero-2-w.dtb; do
    [ -e "$ROOTFS/boot/firmware/$f" ] || die "/boot/firmware/$f is missing"
  done
fi
grep -q "root=PARTUUID=${DISK_ID}-02" "$ROOTFS/boot/firmware/cmdline.txt" || die "cmdline.txt does not boot this image's root"
# A listing for the log (firmware file names are plain).
# shellcheck disable=SC2011
log "boot files: $(ls "$ROOTFS/boot/firmware" | xargs)"
