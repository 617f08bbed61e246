#!/usr/bin/env bash
# Headless Chromium + ChromeDriver (Debian packages) for the dashboard browser test
# (tests/test_dashboard.py, marker "browser"). Idempotent: installs only what is missing.
#   usage: .ci/browser.sh        (as root, or with sudo available)
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    echo "browser.sh: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) and chromedriver already installed"
    exit 0
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || { echo "browser.sh: need root or sudo to apt-get install chromium chromium-driver" >&2; exit 1; }
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
/usr/bin/chromium --version
/usr/bin/chromedriver --version
