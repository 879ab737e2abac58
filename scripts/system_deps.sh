#!/usr/bin/env bash
# Debian packages the test suite uses:
#   asc-music, drascula-music   real music for the decoding tests
#   slurm-wlm, munge            a throwaway local SLURM cluster for tests/test_slurm.py
# Installed only when missing and when running as root; otherwise the tests that need them say why they skip.
set -euo pipefail
packages=(asc-music drascula-music slurm-wlm munge)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: not root or no apt-get; tests needing ${missing[*]} will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing ${missing[*]} (apt-get)" >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
