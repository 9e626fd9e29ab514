#!/bin/bash
# Stage 30: the appliance. The repository's files (tracked and new, not ignored: the working
# tree as `git status` sees it) go to /opt/kalki; a virtual environment from Debian's python3
# with system site packages (python3-bpfcc and python3-nftables are Debian packages) gets
# requirements.txt, image/requirements-image.txt and the `kalki` command, under qemu-user.
set -euo pipefail
# shellcheck source=../lib.sh
. "$IMAGE_DIR/lib.sh"

dest="$ROOTFS/opt/kalki"
rm -rf "$dest"
mkdir -p "$dest"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  # Script text for sh -c: its $f expands there, not here.
  # shellcheck disable=SC2016
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
     | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _ \
     | tar --null -T - -cf -) | tar -C "$dest" -xf -
  git -C "$REPO" describe --always --dirty --tags >"$dest/.image-version" 2>/dev/null || echo unknown >"$dest/.image-version"
else
  tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=out --exclude=build \
      --exclude=__pycache__ --exclude=.pytest_cache -cf - . | tar -C "$dest" -xf -
  echo unknown >"$dest/.image-version"
fi
chown -R 0:0 "$dest"
log "repository copied: $(find "$dest" -type f | wc -l) files, version $(cat "$dest/.image-version")"

# The broker plugin (mosquitto/kalki_denials.c), cross-compiled: the image has no compiler. Its
# Mosquitto headers are the build machine's (the same on every architecture), alone in a
# directory of their own so that the cross compiler keeps its own C library's headers.
headers=$(mktemp -d)
cp /usr/include/mosquitto.h /usr/include/mosquitto_broker.h /usr/include/mosquitto_plugin.h \
   /usr/include/mqtt_protocol.h "$headers/"
mkdir -p "$dest/build"
aarch64-linux-gnu-gcc -shared -fPIC -O2 -Wall -Wextra -Werror -I"$headers" \
  -o "$dest/build/kalki_denials.so" "$dest/mosquitto/kalki_denials.c"
rm -rf "$headers"
log "broker plugin: build/kalki_denials.so ($(stat -c %s "$dest/build/kalki_denials.so") bytes, arm64)"

in_chroot /bin/sh -ec '
cd /opt/kalki
/usr/bin/python3 -m venv --system-site-packages .venv
.venv/bin/pip install -q --no-cache-dir --disable-pip-version-check -r requirements.txt
.venv/bin/pip install -q --no-cache-dir --disable-pip-version-check --only-binary=:all: -r image/requirements-image.txt
.venv/bin/pip install -q --no-cache-dir --disable-pip-version-check --no-build-isolation -e .
.venv/bin/python -m compileall -q appliance
'
log "venv: $(in_chroot /opt/kalki/.venv/bin/pip list --format=freeze 2>/dev/null | wc -l) packages; kalki: $(in_chroot /opt/kalki/.venv/bin/kalki --help >/dev/null && echo ok)"
