#!/usr/bin/env bash
# Install Prometheus and promtool from Debian for the metrics tests; a no-op when both are installed.
# The package's own daemon is kept from starting (and stopped if it started anyway): tests run their
# own prometheus with their own config on a free port.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# RUNLEVEL=1 makes invoke-rc.d skip starting services during installation
$SUDO env RUNLEVEL=1 apt-get install -y -qq --no-install-recommends prometheus >/dev/null
$SUDO service prometheus stop >/dev/null 2>&1 || true
