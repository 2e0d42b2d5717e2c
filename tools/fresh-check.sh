#!/usr/bin/env bash
# make fresh-check: the README's two commands (`make demo`, then `make test`) on a truly fresh
# Debian of each release the README promises, to catch what our own long-lived machines hide
# (packages installed by hand, a newer pip, pip configuration, another release's Python and
# tools...). Run as root: tools/fresh-check.sh [RELEASE...], each 12 (bookworm) or 13 (trixie);
# both, one after the other, by default.
#
# For each release:
#   1. a new Debian root of that release, made by debootstrap --variant=minbase from a cached
#      tarball of its packages (downloaded once into .cache/fresh-check; the root itself is new
#      every run);
#   2. what the machine, not the user, provides: its apt sources (for the root's release: the same
#      entries with this machine's codename replaced), DNS, and local CA certificates (apt and pip
#      may reach the registries only through an egress proxy with its own CA). No pip
#      configuration is copied: a fresh machine has none;
#   3. the user's first step: apt-get install git make (to clone the project and run make);
#   4. a clean clone of this checkout's HEAD in /root/pyvmm;
#   5. in it, as root in the chroot with a clean environment, `make demo` then `make test`.
#
# Each command's output goes to the terminal and to .cache/fresh-check/logs/, each line prefixed
# with the minutes since the command started; the summary names each release and gives each
# command's result and time, split into its phases. Exit status: 0 if both passed on every
# release. KEEP=1 keeps the roots afterwards.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd -P)
cache=$here/.cache/fresh-check
declare -A codename=([12]=bookworm [13]=trixie)
# minbase is Debian's smallest root (apt, dpkg, bash, coreutils...). A fresh Debian 12 server or
# cloud image has more, but of what pyvmm might need only ca-certificates can be counted on;
# python3, git, make, a compiler are all left out, so whatever the project needs must be
# installed by it (make host-deps) or by the user's first step below.
include=ca-certificates
# The user's first step on a fresh machine: the tools to clone the project and to run make.
# Without recommends, so that nothing else the project might need comes along by accident.
first_step="apt-get update -q && apt-get install -y -q --no-install-recommends git make"
keep=${KEEP:-}

say() { echo "fresh-check: $*" >&2; }
die() { say "$*"; exit 1; }

releases=("$@")
[ ${#releases[@]} -gt 0 ] || releases=(12 13)
for r in "${releases[@]}"; do
    [ -n "${codename[$r]:-}" ] || die "unknown release '$r': give 12 (bookworm) or 13 (trixie)"
done

[ "$(id -u)" = 0 ] || die "run as root (it runs debootstrap and chroot)"
grep -qs '^ID=debian' /etc/os-release || die "needs a Debian host (debootstrap, apt sources)"
command -v git >/dev/null || die "git not found"
head=$(git -C "$here" rev-parse HEAD) || die "$here is not a git checkout"
if [ -n "$(git -C "$here" status --porcelain --untracked-files=no)" ]; then
    say "note: the work tree has uncommitted changes; only HEAD ${head:0:12} is checked"
fi
if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null \
        || die "cannot install debootstrap"
fi
# The mirror the machine's apt already uses for its own release (no mirror is named in the
# project); it serves every release.
mirror=$(python3 "$here/tools/armhost/debian.py" --mirror) || die "no Debian mirror in the apt sources"
host_suite=$(. /etc/os-release && echo "$VERSION_CODENAME")

mkdir -p "$cache/logs"
all_logs=$cache/logs/$(date +%Y%m%d-%H%M%S)
mkdir -p "$all_logs"
debootstrap_opts=(--variant=minbase --include="$include")

# One release's check, run as a background job, so in a subshell of its own (its root, traps and
# cleanup are its own): debootstrap, the first step, the clone, `make demo`, `make test`; its
# summary goes to $logs/summary. The body runs, unindented, to the '}' after its summary.
check_release() {
release=$1
suite=${codename[$release]}
logs=$all_logs/debian$release
mkdir -p "$logs"
tarball=$cache/$suite-minbase-${include//,/+}.tgz

# --- cleanup: always, also on failure and Ctrl-C --------------------------------------------
root=
mounts=(proc sys dev dev/pts dev/shm)
cleanup() {
    local rc=$? pid m i left
    set +e
    trap - EXIT INT TERM
    if [ -n "$root" ] && [ -d "$root" ]; then
        # Processes still running in the root are ours (a make interrupted by Ctrl-C, its QEMU):
        # stop them, or the mounts under the root stay busy.
        for i in 1 2 3; do
            left=
            for pid in $(ls /proc | grep -E '^[0-9]+$'); do
                [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$root" ] || continue
                left=yes
                kill "-$([ $i = 3 ] && echo KILL || echo TERM)" "$pid" 2>/dev/null
            done
            [ -z "$left" ] && break
            sleep 2
        done
        for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
            m=$root/${mounts[i]}
            mountpoint -q "$m" && { umount "$m" || umount -l "$m"; }
        done
        if grep -qF " $root/" /proc/self/mountinfo; then
            say "something is still mounted under $root: not removing it"
        elif [ "$keep" = 1 ]; then
            say "kept the root: $root"
        else
            rm -rf --one-file-system "$root"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers --------------------------------------------------------------------------------
mmss() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# Prefix each line with [m:ss] since the start (bash's SECONDS, no process per line). It runs
# in its own process (a pipeline stage), so resetting SECONDS touches nothing else.
stamp() {
    local line e
    SECONDS=0
    while IFS= read -r line || [ -n "$line" ]; do
        e=$SECONDS
        printf '[%3d:%02d] %s\n' $((e / 60)) $((e % 60)) "$line"
    done
}

# Run a shell command line in the root as root, with a clean environment: only what a login
# shell on a fresh machine would have, nothing from this one (no pip or proxy variables).
in_root() {
    chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 /bin/bash -c "$1"
}

# Seconds since the start of the stamped log $1 at its first line matching the ERE $2.
at() {
    grep -m1 -E "^\[ *[0-9]+:[0-9]{2}\] $2" "$1" | sed -E 's/^\[ *([0-9]+):([0-9]{2})\].*/\1 \2/' \
        | awk '{ print $1 * 60 + $2 }'
}

# Phases of a command's log: "name ERE name ERE ... name" -> "name 1m05s, name 0m20s, ...". The
# first phase starts with the command, each later one at the first line matching the ERE before
# its name, and lasts until the next phase that started (or the end); "-" if it never started.
phases() {
    local log=$1 total=$2 i j names=("$3") starts=(0) out= end
    shift 3
    while [ $# -ge 2 ]; do
        starts+=("$(at "$log" "$1")")
        names+=("$2")
        shift 2
    done
    for ((i = 0; i < ${#names[@]}; i++)); do
        out+="${out:+, }${names[i]} "
        if [ -z "${starts[i]}" ]; then
            out+="-"
            continue
        fi
        end=$total
        for ((j = i + 1; j < ${#names[@]}; j++)); do
            [ -n "${starts[j]}" ] && { end=${starts[j]}; break; }
        done
        out+=$(mmss $((end - starts[i])))
    done
    echo "$out"
}

# --- 1. the root --------------------------------------------------------------------------------
t0=$SECONDS
fetched="its packages from the cache"
if [ ! -f "$tarball" ]; then
    say "downloading the $suite minbase packages once (cached in ${tarball#"$here"/})"
    work=$(mktemp -d "$cache/tarball.XXXXXX")
    debootstrap "${debootstrap_opts[@]}" --make-tarball="$tarball.tmp" "$suite" "$work" "$mirror" \
        >"$logs/debootstrap-tarball.log" 2>&1 || { rm -rf "$work" "$tarball.tmp"; die "debootstrap --make-tarball failed, see $logs/debootstrap-tarball.log"; }
    rm -rf "$work"
    mv "$tarball.tmp" "$tarball"
    fetched="its packages downloaded once in $(mmss $((SECONDS - t0)))"
    t0=$SECONDS
fi
root=$(mktemp -d "$cache/root.XXXXXX")
chmod 755 "$root"
say "Debian $release: debootstrap $suite (${debootstrap_opts[*]}) into ${root#"$here"/}"
debootstrap "${debootstrap_opts[@]}" --unpack-tarball="$tarball" "$suite" "$root" "$mirror" \
    >"$logs/debootstrap.log" 2>&1 || die "debootstrap failed, see $logs/debootstrap.log"
t_debootstrap=$((SECONDS - t0))

# --- 2. what the machine provides ---------------------------------------------------------------
# apt sources: the files apt itself reads (sources.list, *.list, *.sources), for the root's
# release (bookworm-updates becomes trixie-updates...). Not the one host-deps writes (pyvmm-*): a
# fresh machine does not have it yet, host-deps must add it there too.
rm -f "$root/etc/apt/sources.list"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    case $(basename "$f") in pyvmm-*) continue ;; esac
    sed -E "s/\b$host_suite\b/$suite/g" "$f" >"$root$f"
    # a keyring the source names and the root lacks (third-party archives)
    for key in $(sed -nE 's/^Signed-By:[[:space:]]*(\/[^[:space:]]+)[[:space:]]*$/\1/p; s/.*signed-by=(\/[^] ]+).*/\1/p' "$f"); do
        [ -f "$key" ] && [ ! -e "$root$key" ] && install -D -m 644 "$key" "$root$key"
    done
done
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
[ -f /etc/hosts ] && cp -L /etc/hosts "$root/etc/hosts"
# Local CA certificates (the egress proxy's), added to the root's bundle as on this machine.
shopt -s nullglob
cas=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob
if [ ${#cas[@]} -gt 0 ]; then
    cp "${cas[@]}" "$root/usr/local/share/ca-certificates/"
    in_root "update-ca-certificates" >>"$logs/debootstrap.log" 2>&1 || die "update-ca-certificates failed in the root"
fi

mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"   # a tmpfs of its own, not the machine's

# --- 3. the user's first step, 4. the clone ---------------------------------------------------
t0=$SECONDS
say "first step in the root: $first_step"
in_root "DEBIAN_FRONTEND=noninteractive; export DEBIAN_FRONTEND; $first_step" </dev/null \
    >"$logs/first-step.log" 2>&1 || die "the first step (git, make) failed, see $logs/first-step.log"
t_first=$((SECONDS - t0))
git clone -q --no-local "$here" "$root/root/pyvmm"
git -C "$root/root/pyvmm" checkout -q --detach "$head" || die "HEAD $head is on no branch: cannot clone it"
say "cloned HEAD ${head:0:12} into /root/pyvmm"

# --- 5. the README's two commands ---------------------------------------------------------------
declare -A result secs
for target in demo test; do
    log=$logs/make-$target.log
    say "make $target (log: ${log#"$here"/})"
    t0=$SECONDS
    # In the background and waited for, so that a TERM or INT reaches the trap at once (bash
    # runs traps only between foreground commands); the status is make's (pipefail).
    in_root "cd /root/pyvmm && make $target" </dev/null 2>&1 | stamp | tee "$log" &
    rc=0
    wait $! || rc=$?
    secs[$target]=$((SECONDS - t0))
    result[$target]=$([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)")
done

python=$(in_root "python3 --version" 2>&1 || echo "no python3")
kvm=$(grep -Eo '^\[ *[0-9]+:[0-9]{2}\] kvm: .*' "$logs/make-test.log" | tail -1 | sed -E 's/^\[[^]]*\] //')
{
    echo "Debian $release ($suite, $python; HEAD ${head:0:12}; logs in ${logs#"$here"/})"
    echo "  debootstrap   $(mmss "$t_debootstrap") ($fetched)"
    echo "  first step    $(mmss "$t_first") (apt-get install git make)"
    echo "  make demo     ${result[demo]} in $(mmss "${secs[demo]}"): $(phases "$logs/make-demo.log" "${secs[demo]}" \
        host-deps 'venv: ' venv 'armhost: ' 'armhost build' 'armhost: booting' demo)"
    echo "  make test     ${result[test]} in $(mmss "${secs[test]}"): $(phases "$logs/make-test.log" "${secs[test]}" \
        'lint+unit' 'armhost: booting' 'KVM tier')${kvm:+; $kvm}"
} >"$logs/summary"
[ "${result[demo]}" = passed ] && [ "${result[test]}" = passed ]
}

# Each release's check runs in the background and is waited for: errexit stays on inside it (a
# function called as `f || ...` would run with it off), and a signal reaches this shell at once.
# INT and TERM are passed on to the check (its own INT is ignored, as a background job's is)
# and end the whole run, with no further release started.
status=0
child=
stop() {
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && { wait "$child" || :; }
    exit "$1"
}
trap 'stop 130' INT
trap 'stop 143' TERM
for release in "${releases[@]}"; do
    check_release "$release" &
    child=$!
    rc=0
    wait "$child" || rc=$?
    child=
    [ "$rc" -lt 128 ] || exit "$rc"
    [ "$rc" = 0 ] || status=1
done
echo
say "summary (logs in ${all_logs#"$here"/})"
for release in "${releases[@]}"; do
    f=$all_logs/debian$release/summary
    if [ -f "$f" ]; then
        sed 's/^/fresh-check: /' "$f" >&2
    else
        say "Debian $release (${codename[$release]}): stopped before its summary, see its logs"
    fi
done
exit "$status"
