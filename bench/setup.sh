#!/bin/sh
# Installs what bench/compare.py needs: nginx (proxy + backends), HAProxy, wrk (keep-alive and resumed
# loads), ab from apache2-utils (full-handshake load), openssl (test certificate), psutil, and fastlb itself;
# and perf, which compare.py's syscall column and bench/breakdown.py use.
# Debian/Ubuntu only; installs packages but never enables or configures their system services.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

missing=""
for tool in nginx haproxy wrk ab openssl; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    echo "setup: missing:$missing -> apt-get install nginx haproxy wrk apache2-utils openssl"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y nginx haproxy wrk apache2-utils openssl
    # The Debian packages start system services (nginx on :80). The bench does not use them and checks
    # that its own ports (8080, 8443, 9101, 9102, 9900) are free before it starts.
else
    echo "setup: nginx, haproxy, wrk, ab and openssl already installed"
fi

if command -v perf >/dev/null 2>&1; then
    echo "setup: perf already installed"
else
    # Debian's package; Ubuntu ships perf per kernel (linux-tools-$(uname -r)).  Not fatal: compare.py
    # then shows no syscall column, and only bench/breakdown.py cannot run.
    echo "setup: perf missing -> apt-get install linux-perf"
    { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y linux-perf; } \
        || echo "setup: WARNING: no perf; bench/breakdown.py will not run"
fi

if "$PY" -c "import psutil" 2>/dev/null; then
    echo "setup: psutil already installed"
else
    echo "setup: installing psutil"
    "$PY" -m pip install psutil
fi

if "$PY" -c "import fastlb.cli" 2>/dev/null; then
    echo "setup: fastlb already importable"
else
    echo "setup: fastlb not importable -> pip install -e ."
    # Not fatal: compare.py then reports fastlb as failed and still measures nginx and HAProxy.
    "$PY" -m pip install -e . || echo "setup: WARNING: 'pip install -e .' failed; fastlb will show as FAILED"
fi
echo "setup: done -- now run: $PY bench/compare.py --quick"
