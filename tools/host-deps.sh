#!/usr/bin/env bash
# Installs the host packages pyvmm's build, tests and demo need, on Debian (run as root).
#   all hosts:   python3-venv, device-tree-compiler, an AArch64 assembler (binutils)
#   non-arm64:   qemu-system-aarch64 (bookworm-backports' QEMU is ~1.5x faster per exit than
#                bookworm's), cpio, binutils-aarch64-linux-gnu
set -euo pipefail

arch=$(uname -m)
need=()
have() { command -v "$1" >/dev/null 2>&1; }
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
have dtc || need+=(device-tree-compiler)
if [ "$arch" = aarch64 ]; then
    have as || need+=(binutils)
else
    have aarch64-linux-gnu-as || need+=(binutils-aarch64-linux-gnu)
    have cpio || need+=(cpio)
    have dpkg-deb || need+=(dpkg)
    have qemu-system-aarch64 || need+=(qemu-system-arm)
fi
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "host-deps: missing packages: ${need[*]} (run as root, or install them)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
qemu_from=()
if [[ " ${need[*]} " == *" qemu-system-arm "* ]] && grep -qs bookworm /etc/os-release; then
    # add bookworm-backports next to the mirror the host already uses, for the newer QEMU
    mirror=$(python3 "$(dirname "$0")/armhost/debian.py" --mirror)
    list=/etc/apt/sources.list.d/pyvmm-backports.sources
    [ -f "$list" ] || printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" > "$list"
    qemu_from=(-t bookworm-backports)
fi
echo "host-deps: installing ${need[*]}"
apt-get update -q
apt-get install -y -q --no-install-recommends "${qemu_from[@]}" "${need[@]}"
