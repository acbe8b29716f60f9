#!/usr/bin/env bash
# Installs the Debian packages the test suite runs (not imports): chromium for the status page test,
# curl, openssl and slowhttptest for the TLS and hardening tests.  Idempotent: with everything present
# it only runs `command -v`.  As non-root it lists what is missing and exits 1.
set -euo pipefail

# command  package
needs=(
  "chromium chromium"
  "curl curl"
  "openssl openssl"
  "slowhttptest slowhttptest"
)

missing=()
for pair in "${needs[@]}"; do
  read -r cmd pkg <<<"$pair"
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
# A headless browser without a single font renders text as empty boxes in screenshots.
if command -v fc-list >/dev/null 2>&1 && [ -z "$(fc-list 2>/dev/null | head -n 1)" ]; then
  missing+=("fonts-dejavu-core")
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "system-deps: all present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing: ${missing[*]}" >&2
  echo "system-deps: run as root (sudo $0) or: apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"
