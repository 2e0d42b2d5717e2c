"""Debian arm64 packages for the emulated host, fetched with a private apt configuration.

The host's own apt state is never touched for arm64: a separate Dir::* tree under the cache holds
the arm64 package lists, so no `dpkg --add-architecture` is needed. The mirror is the one the
host's apt already uses for its own release (read from its sources), or PYVMM_DEBIAN_MIRROR where
the host is not Debian; a Debian mirror serves every release, so nothing here names one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from steps import log, run_step

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR_VARIABLE = "PYVMM_DEBIAN_MIRROR"

# Essential packages and the tools of dpkg's maintainer scripts, there only because Debian installs
# packages with dpkg, which the emulated host never does; and tzdata and procps, which nothing in
# the host uses (busybox has its own ps). The private tree's status lists them as installed, so
# apt's resolver leaves them (and what they pull in: perl, dpkg, tar) out of the host.
PROVIDED = ["perl-base", "debconf", "dpkg", "tar", "init-system-helpers", "ucf", "sensible-utils",
            "procps", "tzdata"]


def host_release(etc: Path = Path("/etc")) -> str:
    """The host's Debian codename (VERSION_CODENAME in os-release), "" elsewhere."""
    try:
        text = (etc / "os-release").read_text()
    except OSError:
        return ""
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.M)
    return m.group(1) if m and re.search(r"^ID=\"?debian\"?$", text, re.M) else ""


def system_mirror(etc: Path = Path("/etc")) -> str:
    """The URI the host's apt uses for its own release of Debian's main archive (deb822 or
    one-line format), or $PYVMM_DEBIAN_MIRROR."""
    if mirror := os.environ.get(MIRROR_VARIABLE, "").strip():
        return mirror.rstrip("/")
    release = host_release(etc)
    if not release:
        raise SystemExit(f"armhost: this host is not Debian: set {MIRROR_VARIABLE} to a Debian mirror's URI")
    sources = [etc / "apt" / "sources.list", *sorted((etc / "apt" / "sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (ln.partition(":") for ln in stanza.splitlines())
                    if not k.startswith("#") and v
                )
                uris, suites = fields.get("uris", "").split(), fields.get("suites", "").split()
                if release in suites and uris and not uris[0].rstrip("/").endswith("-security"):
                    return uris[0].rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(rf"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{release}\s", line)
                if m and not m.group(1).rstrip("/").endswith("-security"):
                    return m.group(1).rstrip("/")
    raise SystemExit(f"armhost: no Debian {release} mirror found in /etc/apt sources "
                     f"(set {MIRROR_VARIABLE} to one)")


class Arm64Apt:
    """apt-get/apt-cache confined to a private arm64 tree under `root`, over `suites`, preferring
    `release` and its -updates (the emulated host's userspace) to every other suite."""

    def __init__(self, root: Path, suites: list[str], release: str) -> None:
        self.root = root
        self.suites = suites
        self.release = release
        self.archives = root / "archives"

    def _opts(self) -> list[str]:
        r = self.root
        return [
            "-o", "APT::Architecture=arm64",
            "-o", "APT::Architectures=arm64",
            "-o", f"Dir::Etc::SourceList={r / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::Etc::Preferences={r / 'preferences'}",  # the machine's own pins stay out
            "-o", "Dir::Etc::PreferencesParts=/dev/null",
            "-o", f"Dir::State={r / 'state'}",
            "-o", f"Dir::State::status={r / 'state' / 'status'}",
            "-o", f"Dir::Cache={r / 'cache'}",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root",  # the cache is root's; _apt could not write it
            "-q",
        ]

    def update(self) -> None:
        (self.root / "state" / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        self.archives.mkdir(parents=True, exist_ok=True)
        # Version 9999 satisfies any versioned dependency on them (Debian policy 5.6.12)
        (self.root / "state" / "status").write_text("".join(
            f"Package: {name}\nStatus: install ok installed\nPriority: optional\nSection: admin\n"
            f"Maintainer: none\nArchitecture: all\nVersion: 9999\n"
            f"Description: not needed in the emulated host\n\n" for name in PROVIDED))
        # both at one priority, so that the newer of the two wins (apt_preferences(5))
        (self.root / "preferences").write_text("".join(
            f"Package: *\nPin: release n={suite}\nPin-Priority: 990\n\n"
            for suite in (self.release, f"{self.release}-updates")))
        mirror = system_mirror()
        lines = [f"deb [arch=arm64 signed-by={KEYRING}] {mirror} {s} main" for s in self.suites]
        (self.root / "sources.list").write_text("\n".join(lines) + "\n")
        log(f"updating arm64 package lists ({', '.join(self.suites)})")
        run_step("apt-get update (arm64 package lists)", ["apt-get", *self._opts(), "update"],
                 stdout=subprocess.DEVNULL)

    def show(self, spec: str) -> str:
        out = run_step(f"apt-cache show {spec}", ["apt-cache", *self._opts(), "show", spec],
                       capture_output=True, text=True)
        stdout: str = out.stdout
        return stdout

    def newest_kernel_package(self, meta: str, suite: str) -> str:
        """The versioned image package that `suite`'s metapackage `meta` depends on (its first
        Depends:), e.g. linux-image-arm64-16k -> linux-image-6.12.95+deb12-arm64-16k."""
        text = self.show(f"{meta}/{suite}")
        m = re.search(r"^Depends:\s*(linux-image-[^\s,(]+)", text, re.M)
        if not m:
            raise SystemExit(f"armhost: cannot resolve {meta} in {suite}")
        return m.group(1)

    def version(self, package: str, suite: str) -> str:
        m = re.search(r"^Version:\s*(\S+)", self.show(f"{package}/{suite}"), re.M)
        if not m:
            raise SystemExit(f"armhost: {package} has no version in {suite}")
        return m.group(1)

    def resolve(self, roots: list[str]) -> list[tuple[str, str]]:
        """`roots` and everything they depend on (no recommends), as (package, version), from the
        preferred release, in the order apt would unpack them."""
        out = run_step("apt-get install --simulate (the emulated host's packages)",
                       ["apt-get", *self._opts(), "install", "--simulate", "--no-install-recommends", *roots],
                       capture_output=True, text=True)
        # "Inst libc6 (2.41-12 Debian:13.8/stable [arm64])"
        found = re.findall(r"^Inst (\S+) \((\S+) ", out.stdout, re.M)
        if not found:
            raise SystemExit(f"armhost: apt resolved nothing for {' '.join(roots)}")
        return found

    def download(self, packages: list[tuple[str, str]]) -> list[Path]:
        """Download each (package, version) into the archive folder, once (cached)."""

        def cached(name: str, version: str) -> Path | None:
            # apt-get download's file name: the epoch's colon URL-quoted
            found = sorted(self.archives.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
            return found[0] if found else None

        missing = [f"{name}={version}" for name, version in packages if cached(name, version) is None]
        if missing:
            log(f"downloading {len(missing)} arm64 packages")
            run_step("apt-get download (arm64 packages)", ["apt-get", *self._opts(), "download", *missing],
                     cwd=self.archives, stdout=subprocess.DEVNULL)
        debs = []
        for name, version in packages:
            deb = cached(name, version)
            if deb is None:
                raise SystemExit(f"armhost: apt-get download left no {name} {version}")
            debs.append(deb)
        return debs


def extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run_step(f"dpkg-deb -x {deb.name}", ["dpkg-deb", "-x", str(deb), str(dest)])


def merge_usr(root: Path) -> None:
    """Lay `root` out as merged-/usr Debian does (bin, sbin and lib are links into usr/): Debian 12's
    packages put files in /lib and /bin, Debian 13's only under /usr, where its programs' ELF
    interpreter (/lib/ld-linux-aarch64.so.1) is found only through the link."""
    for name in ("bin", "sbin", "lib"):
        top, usr = root / name, root / "usr" / name
        usr.mkdir(parents=True, exist_ok=True)
        if top.is_symlink():  # a package shipped the link itself
            continue
        if top.is_dir():
            for entry in sorted(top.rglob("*"), key=lambda p: len(p.parts)):
                target = usr / entry.relative_to(top)
                if entry.is_dir() and not entry.is_symlink():
                    target.mkdir(exist_ok=True)
                elif not target.exists() and not target.is_symlink():
                    entry.rename(target)
            shutil.rmtree(top)
        top.symlink_to(f"usr/{name}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--mirror"]:
        print(system_mirror())
