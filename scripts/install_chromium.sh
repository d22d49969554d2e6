#!/usr/bin/env bash
# Install headless Chromium (Debian's package) for tests/inspect/test_html.py.
#
# The HTML report test opens the report in headless Chromium to check it renders
# with no JavaScript errors; it fails (does not skip) when chromium is missing, so
# CI runs this script during setup. Needs root (or sudo) and the Debian archive.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || echo unknown version)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_chromium.sh: need root or sudo to run apt-get" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# fonts-dejavu-core: a font, so text in screenshots is legible (the report itself embeds none).
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "installed: $(chromium --version)"
