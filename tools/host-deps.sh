#!/usr/bin/env bash
# Installs the host packages pyvmm's build, tests and demo need, on Debian (run as root).
#   all hosts:   python3 with venv, device-tree-compiler, an AArch64 assembler (binutils), an
#                AArch32 one (binutils-arm-linux-gnueabihf, for the --aarch32 test guests), and a C
#                compiler with Python's headers: pylibfdt (which dtschema, a dev dependency, needs)
#                is an sdist only and builds a C extension when the venv is made (the SWIG it
#                needs comes from PyPI as a build requirement, so Debian's swig is not needed);
#                qemu-utils for qemu-storage-daemon (it serves -d disks, and the unit tier drives
#                a real one; QEMU >= 8.0: Debian 13's own, bookworm-backports' on Debian 12)
#   arm64:       busybox-static (pyvmm exec puts it in the guest's initramfs), gdb (the GDB stub's
#                tests drive it; the emulated host has Debian's gdb-minimal), ip and ping (the
#                network tests and benchmarks set up and ping the host's end of a tap; the
#                emulated host has busybox's)
#   non-arm64:   qemu-system-aarch64 (bookworm-backports' QEMU is ~1.5x faster per exit than
#                bookworm's), cpio, dpkg-deb, binutils-aarch64-linux-gnu
set -euo pipefail

arch=$(uname -m)
python=${PYTHON:-python3}  # the one the venv is made from (make PYTHON=...)
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have "$python" && "$python" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3 python3-venv)
have dtc || need+=(device-tree-compiler)
have cc || need+=(gcc)
[ -e /usr/include/stdio.h ] || need+=(libc6-dev)   # gcc only recommends it
# Python.h of the python3 the venv is made from (Debian's python3 gets it from python3-dev)
have "$python" && [ -e "$("$python" -c 'import sysconfig; print(sysconfig.get_path("include"))')/Python.h" ] \
    || need+=(python3-dev)
have arm-linux-gnueabihf-as || need+=(binutils-arm-linux-gnueabihf)
if [ "$arch" = aarch64 ]; then
    have as || need+=(binutils)
    # pyvmm exec's initramfs runs a static busybox (the emulated host has its own)
    dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
    have gdb || need+=(gdb)
    have ip || need+=(iproute2)
    have ping || need+=(iputils-ping)
else
    have aarch64-linux-gnu-as || need+=(binutils-aarch64-linux-gnu)
    have cpio || need+=(cpio)
    have dpkg-deb || need+=(dpkg)
fi
need_qemu=()
if [ "$arch" != aarch64 ] && ! have qemu-system-aarch64; then need_qemu+=(qemu-system-arm); fi
if ! have qemu-storage-daemon; then need_qemu+=(qemu-utils); fi
[ ${#need[@]} -eq 0 ] && [ ${#need_qemu[@]} -eq 0 ] && exit 0

if ! have apt-get; then
    # another distribution: the names are Debian's, the README says what each is for
    echo "host-deps: missing Debian packages: ${need[*]} ${need_qemu[*]} (install their equivalents: this script installs with apt-get)" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "host-deps: missing packages: ${need[*]} ${need_qemu[*]} (run as root, or install them)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
if [ ${#need[@]} -gt 0 ]; then
    echo "host-deps: installing ${need[*]}"
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi
if [ ${#need_qemu[@]} -gt 0 ]; then
    # qemu-system-arm (off arm64) and qemu-utils, from bookworm-backports on Debian 12: its QEMU
    # is faster per exit, and its qemu-utils has qemu-storage-daemon (QEMU >= 8.0); Debian 13's own
    qemu_from=()
    if grep -qs 'VERSION_CODENAME=bookworm' /etc/os-release; then
        # bookworm-backports, next to the mirror the host already uses
        list=/etc/apt/sources.list.d/pyvmm-backports.sources
        if [ ! -f "$list" ]; then
            mirror=$(python3 "$(dirname "$0")/armhost/debian.py" --mirror)
            printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$mirror" > "$list"
            apt-get update -q
        fi
        qemu_from=(-t bookworm-backports)
    fi
    echo "host-deps: installing ${need_qemu[*]} ${qemu_from[*]}"
    apt-get install -y -q --no-install-recommends "${qemu_from[@]}" "${need_qemu[@]}"
fi
