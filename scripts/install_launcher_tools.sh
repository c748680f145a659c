#!/usr/bin/env bash
# Install what the launcher end-to-end test (scripts/launcher_e2e.sh) needs beside Python: an SSH
# server and client, rsync (`ray up` file_mounts, `ray rsync-down`) and netcat (the SSH proxy
# command), from Debian's apt. Idempotent and quiet; returns at once when all are present. Needs
# root (or sudo without a password) and no standard input, as in CI. Exits 1 when a tool is missing
# and cannot be installed: the caller decides whether that fails (CI) or skips the test (a laptop).
set -euo pipefail

PACKAGES=(openssh-server openssh-client rsync netcat-openbsd)
have() {
    local tool
    for tool in ssh ssh-keygen rsync nc; do command -v "$tool" >/dev/null 2>&1 || return 1; done
    command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]
}
if have; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_launcher_tools.sh: ${PACKAGES[*]} are needed and installing them needs root" >&2
        exit 1
    fi
fi

apt_get() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o Dpkg::Use-Pty=0 "$@" </dev/null; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# try the current package lists first; refresh them only if that fails (stale or never fetched)
if ! apt_get install -y --no-install-recommends "${PACKAGES[@]}" >"$log" 2>&1; then
    if ! { apt_get update && apt_get install -y --no-install-recommends "${PACKAGES[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "install_launcher_tools.sh: could not install ${PACKAGES[*]} with apt-get" >&2
        exit 1
    fi
fi
have || { cat "$log" >&2; echo "install_launcher_tools.sh: installed, but sshd/ssh/rsync/nc are still not found" >&2; exit 1; }
echo "install_launcher_tools.sh: installed ${PACKAGES[*]}"
