#!/usr/bin/env bash
# Runs shellcheck on the repository's shell scripts: build_image.sh, image/*.sh,
# image/stages/*.sh, image/hooks/*, scripts/*.sh, and the shell scripts under image/files/ (found
# by their #! line). Settings (sourced files are followed) are in .shellcheckrc. Exits non-zero
# on any finding.  Usage: scripts/lint-shell.sh [shellcheck options]
set -euo pipefail
cd "$(dirname "$0")/.."

command -v shellcheck >/dev/null || { echo "lint-shell: shellcheck is missing (apt-get install shellcheck)" >&2; exit 2; }

files=(build_image.sh .ci/run image/*.sh image/stages/*.sh image/hooks/* scripts/*.sh)
while IFS= read -r -d '' f; do
  # #!/bin/sh, #!/bin/bash, #!/usr/bin/env bash, ... (not e.g. #!/usr/sbin/nft -f)
  if head -n 1 "$f" | grep -qE '^#![[:space:]]*/(usr/)?bin/(env[[:space:]]+)?(ba|da)?sh([[:space:]]|$)'; then
    files+=("$f")
  fi
done < <(find image/files -type f -print0 | sort -z)

for f in "${files[@]}"; do
  [ -f "$f" ] || { echo "lint-shell: $f: no such file" >&2; exit 2; }
done
printf 'lint-shell: %s\n' "${files[@]}"
shellcheck --external-sources "$@" -- "${files[@]}"
echo "lint-shell: ${#files[@]} files, no findings"
