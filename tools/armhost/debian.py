"""Debian arm64 packages for the emulated host, fetched with a private apt configuration.

The host's own apt state is never touched for arm64: a separate Dir::* tree under the cache holds
the arm64 package lists, so no `dpkg --add-architecture` is needed. The mirror is whatever the
host's apt already uses for bookworm (read from its sources), so nothing here names a mirror.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from steps import log, run_step

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SUITES = ("bookworm", "bookworm-updates", "bookworm-backports")


def system_mirror() -> str:
    """The URI the host's apt uses for Debian's main archive (deb822 or one-line format)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
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
                if "bookworm" in suites and uris and not uris[0].rstrip("/").endswith("-security"):
                    return uris[0].rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
                if m and not m.group(1).rstrip("/").endswith("-security"):
                    return m.group(1).rstrip("/")
    raise SystemExit("armhost: no Debian bookworm mirror found in /etc/apt sources")


class Arm64Apt:
    """apt-get/apt-cache confined to a private arm64 tree under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.archives = root / "archives"

    def _opts(self) -> list[str]:
        r = self.root
        return [
            "-o", "APT::Architecture=arm64",
            "-o", "APT::Architectures=arm64",
            "-o", f"Dir::Etc::SourceList={r / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
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
        (self.root / "state" / "status").touch()
        self.archives.mkdir(parents=True, exist_ok=True)
        mirror = system_mirror()
        lines = [f"deb [arch=arm64 signed-by={KEYRING}] {mirror} {s} main" for s in SUITES]
        (self.root / "sources.list").write_text("\n".join(lines) + "\n")
        log(f"updating arm64 package lists ({', '.join(SUITES)})")
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

    def download(self, packages: list[str]) -> list[Path]:
        """Download the newest candidate of each package into the archive folder (cached)."""
        missing = []
        for pkg in packages:
            name = pkg.split("/")[0]
            if not any(self.archives.glob(f"{name}_*_arm64.deb")) and not any(
                self.archives.glob(f"{name}_*_all.deb")
            ):
                missing.append(pkg)
        if missing:
            log(f"downloading {len(missing)} arm64 packages: {' '.join(missing)}")
            run_step("apt-get download (arm64 packages)", ["apt-get", *self._opts(), "download", *missing],
                     cwd=self.archives)
        debs = []
        for pkg in packages:
            name = pkg.split("/")[0]
            found = sorted(self.archives.glob(f"{name}_*_arm64.deb")) or sorted(
                self.archives.glob(f"{name}_*_all.deb")
            )
            debs.append(found[-1])
        return debs


def extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run_step(f"dpkg-deb -x {deb.name}", ["dpkg-deb", "-x", str(deb), str(dest)])


if __name__ == "__main__":
    if sys.argv[1:] == ["--mirror"]:
        print(system_mirror())
