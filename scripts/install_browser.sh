#!/usr/bin/env bash
# Install the headless browser the MLflow UI test drives (tests/test_mlflow_ui.py): Debian's
# chromium + chromium-driver from apt. Never `playwright install`: it downloads a browser, which these
# machines cannot. Idempotent and quiet; returns at once when both are already installed. Needs root
# (or sudo without a password) and no standard input, as in CI.
set -euo pipefail

have() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
if have; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_browser.sh: chromium is missing and installing it needs root; the MLflow UI test will be skipped" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
apt_get() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o Dpkg::Use-Pty=0 "$@" </dev/null; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# try the current package lists first; refresh them only if that fails (stale or never fetched)
if ! apt_get install -y --no-install-recommends chromium chromium-driver >"$log" 2>&1; then
    if ! { apt_get update && apt_get install -y --no-install-recommends chromium chromium-driver; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "install_browser.sh: could not install chromium + chromium-driver with apt-get" >&2
        exit 1
    fi
fi
have || { cat "$log" >&2; echo "install_browser.sh: chromium installed but not on PATH" >&2; exit 1; }
echo "install_browser.sh: $(chromium --version 2>/dev/null || echo chromium) installed"
