"""The emulated host's build (tools/armhost) on each Debian release: where its packages come from
and how they are laid out. Its real build and boot are what every KVM tier run starts with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools" / "armhost"))
import boot  # noqa: E402
from debian import MIRROR_VARIABLE, merge_usr, system_mirror  # noqa: E402
from image import VIRTIOFSD_FOREIGN, VIRTIOFSD_RELEASE_FROM, userspace_release, userspace_roots  # noqa: E402

MIRROR = "http://mirror.example/debian"

TRIXIE_SOURCES = f"""Types: deb
URIs: {MIRROR}-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {MIRROR}/
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def etc_of(tmp_path: Path, codename: str, *, distro: str = "debian", sources: str = "", lists: str = "") -> Path:
    etc = tmp_path / "etc"
    (etc / "apt" / "sources.list.d").mkdir(parents=True)
    (etc / "os-release").write_text(f'PRETTY_NAME="x"\nID={distro}\nVERSION_CODENAME={codename}\n')
    if sources:
        (etc / "apt" / "sources.list.d" / "debian.sources").write_text(sources)
    if lists:
        (etc / "apt" / "sources.list").write_text(lists)
    return etc


@pytest.fixture(autouse=True)
def no_mirror_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_VARIABLE, raising=False)


def test_the_mirror_is_the_one_for_the_hosts_own_release(tmp_path: Path) -> None:
    # Debian 13's deb822 sources name no bookworm suite; the security archive is not the mirror
    assert system_mirror(etc_of(tmp_path, "trixie", sources=TRIXIE_SOURCES)) == MIRROR
    lists = f"deb {MIRROR}-security bookworm-security main\ndeb [arch=amd64] {MIRROR} bookworm main\n"
    assert system_mirror(etc_of(tmp_path / "12", "bookworm", lists=lists)) == MIRROR


def test_no_mirror_is_one_line_naming_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match=f"no Debian trixie mirror found.*{MIRROR_VARIABLE}"):
        system_mirror(etc_of(tmp_path, "trixie", lists=f"deb {MIRROR} bookworm main\n"))
    ubuntu = etc_of(tmp_path / "u", "noble", distro="ubuntu")
    with pytest.raises(SystemExit, match=f"not Debian: set {MIRROR_VARIABLE}"):
        system_mirror(ubuntu)
    monkeypatch.setenv(MIRROR_VARIABLE, MIRROR + "/")
    assert system_mirror(ubuntu) == MIRROR


def test_the_emulated_hosts_python_is_the_one_building_it() -> None:
    assert userspace_release((3, 11)) == ("bookworm", "3.11")
    assert userspace_release((3, 13)) == ("trixie", "3.13")
    assert "python3.13-minimal" in userspace_roots("3.13", "trixie")
    # virtio-fs's daemon: Debian 13's own package, or, on Debian 12, Debian 13's beside the host's
    assert "virtiofsd" in userspace_roots("3.13", "trixie") and "virtiofsd" not in userspace_roots("3.11", "bookworm")
    assert VIRTIOFSD_FOREIGN[0] == "trixie" and VIRTIOFSD_RELEASE_FROM == "bookworm"
    # a Python no Debian release has: the newest release's (its bytecode is then compiled there)
    assert userspace_release((3, 12)) == userspace_release((3, 14)) == ("trixie", "3.13")
    assert userspace_release()[1] == "{}.{}".format(*sys.version_info[:2])  # this machine's Python


def test_packages_of_either_layout_end_up_merged_under_usr(tmp_path: Path) -> None:
    # Debian 12's libc6 and busybox-static ship /lib and /bin, Debian 13's only /usr/lib, /usr/bin
    root = tmp_path / "root"
    (root / "lib" / "aarch64-linux-gnu").mkdir(parents=True)
    (root / "lib" / "aarch64-linux-gnu" / "libc.so.6").write_text("libc")
    (root / "lib" / "ld-linux-aarch64.so.1").symlink_to("aarch64-linux-gnu/ld-linux-aarch64.so.1")
    (root / "bin").mkdir()
    (root / "bin" / "busybox").write_text("busybox")
    (root / "usr" / "lib" / "aarch64-linux-gnu").mkdir(parents=True)
    (root / "usr" / "lib" / "aarch64-linux-gnu" / "ld-linux-aarch64.so.1").write_text("ld")
    (root / "usr" / "bin").mkdir()
    (root / "usr" / "bin" / "python3.13").write_text("python")
    merge_usr(root)
    for name in ("bin", "sbin", "lib"):
        assert (root / name).is_symlink() and str((root / name).readlink()) == f"usr/{name}"
    assert (root / "lib" / "ld-linux-aarch64.so.1").read_text() == "ld"  # the ELF interpreter's path
    assert (root / "usr" / "lib" / "aarch64-linux-gnu" / "libc.so.6").read_text() == "libc"
    assert (root / "bin" / "busybox").read_text() == "busybox"  # image.INIT_SCRIPT's #!/bin/busybox
    assert (root / "bin" / "python3.13").read_text() == "python"


def test_apts_plan_is_read_and_each_version_downloaded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    import debian

    apt = debian.Arm64Apt(tmp_path, ["trixie", "trixie-updates"], "trixie")
    apt.archives.mkdir()
    downloads: list[list[str]] = []
    plan = ("NOTE: This is only a simulation!\n"
            "Inst libc6 (2.41-12+deb13u5 Debian:13.8/stable [arm64])\n"
            "Inst busybox-static (1:1.37.0-6+b9 Debian:13.8/stable [arm64])\n"
            "Conf libc6 (2.41-12+deb13u5 Debian:13.8/stable [arm64])\n")

    def run_step(what: str, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if "--simulate" in argv:
            return subprocess.CompletedProcess(argv, 0, plan, "")
        specs = argv[argv.index("download") + 1:]
        downloads.append(specs)
        for spec in specs:  # as apt-get download names them: the epoch's colon quoted
            name, version = spec.split("=")
            (apt.archives / f"{name}_{version.replace(':', '%3a')}_arm64.deb").touch()
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(debian, "run_step", run_step)
    packages = apt.resolve(["busybox-static"])
    assert packages == [("libc6", "2.41-12+deb13u5"), ("busybox-static", "1:1.37.0-6+b9")]
    debs = apt.download(packages)
    assert [d.name for d in debs] == ["libc6_2.41-12+deb13u5_arm64.deb", "busybox-static_1%3a1.37.0-6+b9_arm64.deb"]
    assert apt.download(packages) == debs and len(downloads) == 1  # cached: not downloaded again


def test_the_hosts_cpu_has_mte_unless_another_cpu_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU refuses mte=on for a CPU without MTE: only the default `max` CPU gets it."""
    monkeypatch.delenv("ARMHOST_CPU", raising=False)
    default = boot.qemu_command(Path("Image"), Path("initrd"), 3, 2, 3072)
    assert "virt,virtualization=on,mte=on,gic-version=3" in default and "max,pauth-impdef=on" in default
    monkeypatch.setenv("ARMHOST_CPU", "cortex-a72")
    other = boot.qemu_command(Path("Image"), Path("initrd"), 2, 2, 3072)
    assert "virt,virtualization=on,gic-version=2" in other and "cortex-a72" in other


def test_wheels_fetched_for_another_list_are_not_taken_for_this_one(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel cache is shared by every checkout using it: the folder another branch's list
    (without pytest-xdist) completed is not this list's, and stays as it is."""
    import image
    from shapes import SHAPES

    monkeypatch.setattr(image, "BINARY_WHEELS", ["cffi", "pycparser", "ioctl-opt", "pytest", "hypothesis"])
    other = image.HostImage(tmp_path, SHAPES["default"])
    other.wheels.mkdir(parents=True)
    (other.wheels / ".complete").touch()
    monkeypatch.undo()
    host = image.HostImage(tmp_path, SHAPES["default"])
    fetched: list[str] = []
    monkeypatch.setattr(image, "run_step", lambda what, argv: fetched.append(what))
    host._fetch_wheels()
    assert host.wheels != other.wheels and (other.wheels / ".complete").is_file()
    assert fetched == ["pip download (aarch64 wheels)", "pip wheel pyfdt"]
    fetched.clear()
    host._fetch_wheels()  # now complete for this list
    assert fetched == []
