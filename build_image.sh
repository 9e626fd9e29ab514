#!/usr/bin/env bash
# Builds the flashable SD-card image (issue 5). The recipe in image/ is not written yet: this
# says so plainly instead of producing something that is not the appliance.
set -euo pipefail
case "${1:-}" in
  -h|--help)
    echo "usage: ./build_image.sh [--out DIR] [--base-image FILE]"
    echo "Builds the Kalki SD-card image for 64-bit Raspberry Pi boards (not implemented yet: issue 5)."
    exit 0 ;;
esac
echo "build_image.sh: the image recipe (image/) is not written yet; see issue 5" >&2
exit 2
