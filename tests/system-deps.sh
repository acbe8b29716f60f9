#!/usr/bin/env bash
# Installs the Debian packages the test suite runs (not imports): curl, openssl and slowhttptest for
# the TLS and hardening tests, which fail without them; haproxy, the real PROXY protocol peer of
# tests/test_proxy_header.py; pebble and pebble-challtestsrv (Let's
# Encrypt's test CA and its DNS server) for the ACME tests; systemd for `systemd-analyze verify` of
# deploy/systemd/fastlb.service (nothing is started); chromium for the status page browser test.
# Idempotent: with everything present it only runs `command -v`.  As non-root it lists what is
# missing and exits 1 if a required program is.
#
# Chromium is optional: 25 packages with --no-install-recommends, a 124 MB download, 414 MB
# installed (apt-get on Debian 12, 2026-11-29).  Where it is missing or cannot be installed, the
# browser test is skipped and pytest's summary says why, so it never costs the run.
set -euo pipefail

# command  package
needs=(
  "curl curl"
  "openssl openssl"
  "slowhttptest slowhttptest"
  "haproxy haproxy"
  "systemd-analyze systemd"
  "pebble pebble"
  "pebble-challtestsrv pebble"
)

missing=()
for pair in "${needs[@]}"; do
  read -r cmd pkg <<<"$pair"
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
browser=()
command -v chromium >/dev/null 2>&1 || browser+=("chromium")
# A headless browser without a single font renders text as empty boxes in screenshots.
if command -v fc-list >/dev/null 2>&1 && [ -z "$(fc-list 2>/dev/null | head -n 1)" ]; then
  browser+=("fonts-dejavu-core")
fi

if [ ${#missing[@]} -eq 0 ] && [ ${#browser[@]} -eq 0 ]; then
  echo "system-deps: all present"
  exit 0
fi

skipped="the status page browser test will be skipped"
if [ "$(id -u)" -ne 0 ]; then
  if [ ${#browser[@]} -gt 0 ]; then
    echo "system-deps: missing ${browser[*]}: $skipped (as root: apt-get install -y" \
         "--no-install-recommends ${browser[*]}, a 124 MB download)" >&2
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo "system-deps: missing: ${missing[*]}" >&2
    echo "system-deps: run as root (sudo $0) or: apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
if [ ${#missing[@]} -gt 0 ]; then
  echo "system-deps: installing ${missing[*]}"
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
if [ ${#browser[@]} -gt 0 ]; then
  echo "system-deps: installing ${browser[*]} (25 packages, a 124 MB download, 414 MB installed)"
  apt-get install -y --no-install-recommends "${browser[@]}" ||
    echo "system-deps: could not install ${browser[*]}: $skipped" >&2
fi
