#!/bin/bash
# Stage 70: what is shipped, in $OUT: the image compressed with xz, a .bmap (when bmaptool is
# at hand) and a manifest: the image's sha256 and every Debian and Python package's version.
set -euo pipefail
# shellcheck source=../lib.sh
. "$IMAGE_DIR/lib.sh"

img="$WORK/image.img"
[ -e "$img" ] || die "no image: stage 60 has not run"
mkdir -p "$OUT"
name="$IMAGE_NAME-$IMAGE_VERSION"
rm -f "$OUT/$name".*

if command -v bmaptool >/dev/null; then
  bmaptool create -o "$OUT/$name.img.bmap" "$img"
  log "bmap: $OUT/$name.img.bmap"
fi
img_sha=$(sha256sum "$img" | cut -d' ' -f1)
log "xz -$XZ_LEVEL -T0 ($(du -m --apparent-size "$img" | cut -f1) MiB, $(du -m "$img" | cut -f1) MiB allocated)"
xz -T0 -"$XZ_LEVEL" -c "$img" >"$OUT/$name.img.xz.partial"
mv "$OUT/$name.img.xz.partial" "$OUT/$name.img.xz"
xz_sha=$(sha256sum "$OUT/$name.img.xz" | cut -d' ' -f1)

version=$(kernel_version)
{
  echo "# Kalki SD-card image manifest"
  echo "image: $name.img.xz"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "appliance: $(cat "$ROOTFS/opt/kalki/.image-version" 2>/dev/null)"
  echo "base: ${BASE_IMAGE:-Debian $SUITE arm64 ($MIRROR)}"
  echo "kernel: $version"
  echo "disk-id: 0x$DISK_ID"
  echo "sha256 $name.img: $img_sha"
  echo "sha256 $name.img.xz: $xz_sha"
  echo "size $name.img: $(stat -c %s "$img")"
  echo "size $name.img.xz: $(stat -c %s "$OUT/$name.img.xz")"
  echo
  echo "## partitions"
  sfdisk -d "$img" | grep '^/' | sed "s#$img#$name.img#"
  echo
  echo "## Debian packages (dpkg)"
  dpkg-query --admindir="$ROOTFS/var/lib/dpkg" -W -f='${Package}\t${Version}\t${Architecture}\n' | sort
  echo
  echo "## Python packages in /opt/kalki/.venv (pip freeze, without Debian's)"
  in_chroot /opt/kalki/.venv/bin/pip freeze --local --disable-pip-version-check 2>/dev/null | sort
} >"$OUT/$name.manifest.txt"
( cd "$OUT" && sha256sum "$name.img.xz" >"$name.img.xz.sha256" )
log "$OUT/$name.img.xz: $(du -h "$OUT/$name.img.xz" | cut -f1), sha256 $xz_sha"
log "manifest: $OUT/$name.manifest.txt ($(grep -c $'\t' "$OUT/$name.manifest.txt") Debian packages)"
