#!/usr/bin/env bash
# One set-up path for a fresh Debian machine (and for CI): Debian packages, kernel headers for
# bcc, the BPF file system, and .venv. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  python3 python3-venv python3-pip python3-bpfcc bpfcc-tools nftables python3-nftables
  mosquitto mosquitto-clients iproute2 iputils-ping netsniff-ng dnsmasq-base busybox chromium chromium-driver
  gcc libc6-dev mosquitto-dev libmosquitto-dev shellcheck nmap hydra xdp-tools
)
ARCH_HEADERS="linux-headers-$(dpkg --print-architecture)"

log() { printf 'setup: %s\n' "$*" >&2; }

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done

kernel=$(uname -r)
build_dir="/lib/modules/$kernel/build"
if [ ! -e "$build_dir/include" ]; then
  # Prefer the running kernel's own headers (on a Pi: its headers package). Without them, fall
  # back to Debian's generic headers linked under /lib/modules (ARCHITECTURE.md, measured):
  # BCC_KERNEL_SOURCE alone is not enough for bcc.
  if apt-cache show "linux-headers-$kernel" >/dev/null 2>&1; then
    missing+=("linux-headers-$kernel")
  else
    missing+=("$ARCH_HEADERS")
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
  if ! apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >/tmp/kalki-apt.log 2>&1; then
    # linux-headers-$kernel may be listed but not installable: retry with the generic headers
    log "apt-get failed (see /tmp/kalki-apt.log); retrying with $ARCH_HEADERS"
    filtered=()
    for p in "${missing[@]}"; do [[ $p == linux-headers-* ]] || filtered+=("$p"); done
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${filtered[@]}" "$ARCH_HEADERS"
  fi
fi

if [ ! -e "$build_dir/include" ]; then
  # Debian's header directory names are plain (no blanks): ls | sort -V picks the newest.
  # shellcheck disable=SC2012
  arch_dir=$(ls -d /usr/src/linux-headers-*-"$(dpkg --print-architecture)" 2>/dev/null | sort -V | tail -n 1)
  # The same for the -common headers.
  # shellcheck disable=SC2012
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
    log "no kernel headers under /usr/src: bcc cannot compile"; exit 1
  fi
  log "kernel $kernel has no headers of its own: linking $arch_dir"
  mkdir -p "/lib/modules/$kernel"
  ln -sfn "$arch_dir" "$build_dir"
  ln -sfn "$common_dir" "/lib/modules/$kernel/source"
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# The broker plugin that counts refused publishes (appliance/system/broker.py loads it when present).
plugin=build/kalki_denials.so
if [ ! -e "$plugin" ] || [ mosquitto/kalki_denials.c -nt "$plugin" ]; then
  log "building $plugin"
  mkdir -p build
  cc -shared -fPIC -O2 -Wall -Wextra -Werror -o "$plugin" mosquitto/kalki_denials.c
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc, nftables' 2>/dev/null; then
  log "creating .venv from /usr/bin/python3 with system site packages"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing requirements-test.txt (the appliance's and the tests' packages) and the kalki command into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e .
  echo "$want" >"$stamp"
fi
log "ready"
