#!/usr/bin/env bash
# The image's boot test (make image-boot-test): boots the built image in qemu-system-aarch64
# (virt machine) with the image's own kernel and initramfs, taken from its firmware partition,
# and its own root file system, and waits, with a hard time limit, for the supervisor to report
# on the serial console that protection is enforced.
#
#   image/boot-test.sh [IMAGE] [--timeout SECONDS] [--keep]
#
# IMAGE: an .img.xz (default: the newest out/*.img.xz) or an .img. The image file is not
# changed: a sparse scratch copy, 1 GiB larger (so first boot grows the data partition), gets
# the site settings a technician would drop on the FAT partition (kalki.toml: devices on eth1,
# uplink eth0), as qemu's two virtio network cards. Once protection is enforced, the operator's
# page must answer over HTTPS on the uplink (port 443, forwarded by qemu to a loopback port).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
TIMEOUT=${BOOT_TEST_TIMEOUT:-1200}
IMAGE="" KEEP=0
while [ $# -gt 0 ]; do
  case $1 in
    --timeout) TIMEOUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) IMAGE=$1; shift ;;
  esac
done
if [ -z "$IMAGE" ]; then
  # ls -t: the newest by modification time (the build's own file names).
  # shellcheck disable=SC2012
  IMAGE=$(ls -t "$REPO"/out/*.img.xz 2>/dev/null | head -n 1 || true)
  [ -n "$IMAGE" ] || { echo "boot-test: no out/*.img.xz; run make image first" >&2; exit 2; }
fi
for tool in qemu-system-aarch64 mcopy sfdisk xz; do
  command -v "$tool" >/dev/null || { echo "boot-test: $tool is missing (apt-get install qemu-system-arm mtools fdisk xz-utils)" >&2; exit 2; }
done

T=$(mktemp -d /tmp/kalki-boot-test.XXXXXX)
CONSOLE=/tmp/kalki-boot-test.console.log
qemu_pid=""
# Called by the EXIT trap (shellcheck 0.9 takes it for unreachable).
# shellcheck disable=SC2317
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then kill "$qemu_pid"; wait "$qemu_pid" 2>/dev/null || true; fi
  # Kept as it was: rm -rf runs when not keeping (or, as before, if that echo ever failed).
  # shellcheck disable=SC2015
  [ "$KEEP" = 1 ] && echo "boot-test: kept $T" || rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$(date +%s)
echo "boot-test: $IMAGE"
case $IMAGE in
  *.xz) xz -dc -T0 "$IMAGE" | dd of="$T/disk.img" bs=1M conv=sparse status=none ;;
  *) cp --sparse=always "$IMAGE" "$T/disk.img" ;;
esac
truncate -s +1G "$T/disk.img"
read -r fw_start < <(sfdisk -J "$T/disk.img" | python3 -c '
import json, sys
print(json.load(sys.stdin)["partitiontable"]["partitions"][0]["start"])')
FAT="$T/disk.img@@$(( fw_start * 512 ))"

# The site settings, as a technician would write them (wired devices side: qemu has no Wi-Fi).
cat >"$T/kalki.toml" <<'EOF'
[network]
devices_interface = "eth1"
uplink_interface = "eth0"
[time]
timezone = "Europe/Berlin"
[business_hours]
days = ["mon", "tue", "wed", "thu", "fri"]
start = "08:00"
end = "18:00"
EOF
mcopy -o -i "$FAT" "$T/kalki.toml" ::kalki.toml
kernel=$(mdir -b -i "$FAT" :: | sed 's#^::/##' | grep '^vmlinuz-' | sort -V | tail -n 1)
initrd=$(mdir -b -i "$FAT" :: | sed 's#^::/##' | grep '^initrd.img-' | sort -V | tail -n 1)
# Both must be found, else fail: (A && B) || C is meant.
# shellcheck disable=SC2015
[ -n "$kernel" ] && [ -n "$initrd" ] || { echo "boot-test: no vmlinuz-*/initrd.img-* on the firmware partition" >&2; exit 1; }
mcopy -i "$FAT" "::$kernel" "::$initrd" ::cmdline.txt "$T/"
# The image's own command line, with qemu's serial port (PL011: ttyAMA0) as the console.
cmdline="$(sed -E 's/console=[^ ]+//g; s/cma=[^ ]+//g' "$T/cmdline.txt" | tr -s ' ') console=ttyAMA0,115200"
echo "boot-test: kernel $kernel, initramfs $initrd"
echo "boot-test: command line: $cmdline"
t_prep=$(( $(date +%s) - t0 ))
WEB_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

: >"$CONSOLE"
qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2 -m 2048 -accel tcg,thread=multi \
  -display none -monitor none -serial "file:$CONSOLE" -no-reboot \
  -kernel "$T/$kernel" -initrd "$T/$initrd" -append "$cmdline" \
  -drive "file=$T/disk.img,format=raw,if=none,id=disk0" -device virtio-blk-pci,drive=disk0 \
  -netdev "user,id=uplink,hostfwd=tcp:127.0.0.1:$WEB_PORT-:443" -device virtio-net-pci,netdev=uplink,addr=0x5,romfile= \
  -netdev user,id=devices,restrict=on -device virtio-net-pci,netdev=devices,addr=0x6,romfile= \
  >"$T/qemu.out" 2>&1 &
qemu_pid=$!
t_boot=$(date +%s)
echo "boot-test: qemu started (pid $qemu_pid); console: $CONSOLE; limit ${TIMEOUT}s"

seen() { grep -a -q -- "$1" "$CONSOLE"; }
mark() { printf '  %-46s %4ds\n' "$1" $(( $(date +%s) - t_boot )); }
declare -A marked=()
milestones=("Run /init as init process|initramfs started"
            "Detected architecture|systemd started"
            "kalki-site: |site settings read"
            "kalki-firstboot: partition|data partition grown"
            "Started.*kalki\.service|supervisor started"
            "Started.*kalki-gate\.service|gate started"
            "login: |login prompt"
            "kalki: protection enforced for|protection enforced"
            "kalki: boot firewall removed|boot firewall removed")
result=1
while :; do
  for m in "${milestones[@]}"; do
    pattern=${m%%|*}; label=${m#*|}
    if [ -z "${marked[$label]:-}" ] && seen "$pattern"; then marked[$label]=1; mark "$label"; fi
  done
  if seen "kalki: protection enforced for"; then
    # A moment for the boot firewall's removal to be reported too.
    for _ in $(seq 1 30); do seen "kalki: boot firewall removed" && break; sleep 1; done
    seen "kalki: boot firewall removed" && [ -z "${marked[boot firewall removed]:-}" ] && mark "boot firewall removed"
    # The operator's page, as a browser on the uplink sees it: TLS with the certificate the
    # appliance made at first start, /healthz, and the claim page (no admin yet).
    if web=$(python3 - "$WEB_PORT" <<'PY'
import http.client, json, socket, ssl, sys, time
port = int(sys.argv[1])
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE     # self-signed, made at first start
deadline, last = time.monotonic() + 120, None
while time.monotonic() < deadline:
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20)) as t:
            tls = t.version()
        c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
        c.request("GET", "/healthz")
        r = c.getresponse()
        health = (r.status, json.loads(r.read()))
        c.close()
        c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
        c.request("GET", "/claim")
        r = c.getresponse()
        page = r.read().decode()
        ok = health[0] == 200 and health[1].get("ok") and r.status == 200 and "Claim this gateway" in page
        print(f"{tls}, /healthz {health[0]} {health[1]}, /claim {r.status}"
              f" (Strict-Transport-Security: {r.getheader('Strict-Transport-Security')})")
        sys.exit(0 if ok else 1)
    except (OSError, http.client.HTTPException, ValueError) as e:
        last = e
        time.sleep(3)
print(f"no answer: {last}")
sys.exit(1)
PY
    ); then
      mark "web page over HTTPS"
      echo "boot-test: web page: $web"
      result=0
    else
      echo "boot-test: the web page did not answer over HTTPS on the uplink: $web" >&2
    fi
    break
  fi
  if ! kill -0 "$qemu_pid" 2>/dev/null; then echo "boot-test: qemu exited" >&2; cat "$T/qemu.out" >&2; break; fi
  if [ $(( $(date +%s) - t_boot )) -ge "$TIMEOUT" ]; then echo "boot-test: no enforcement after ${TIMEOUT}s" >&2; break; fi
  sleep 2
done
t_total=$(( $(date +%s) - t_boot ))
echo "--- console (kalki lines and failures) ---"
grep -a -E 'kalki|FAILED|Failed to start|Kernel panic|emergency' "$CONSOLE" | tail -n 40 | sed 's/^/  /' || true
if [ $result -eq 0 ]; then
  line=$(grep -a -o 'kalki: protection enforced for [0-9]* devices[^"]*' "$CONSOLE" | head -n 1 | tr -d '\r')
  echo "boot-test: PASSED: \"$line\" ${t_total}s after power-on (preparation ${t_prep}s)"
  seen "kalki: boot firewall removed" || echo "boot-test: note: the boot firewall's removal was not reported"
  if grep -a -q 'FAILED' "$CONSOLE"; then echo "boot-test: note: some unit failed (see above)"; fi
else
  echo "boot-test: FAILED after ${t_total}s; last console lines:" >&2
  tail -n 40 "$CONSOLE" | sed 's/^/  /' >&2
fi
exit $result
