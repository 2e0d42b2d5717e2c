"""SMCCC filter validation and installation against a fake VM fd."""

from __future__ import annotations

import errno

import pytest

from kvm_bindings.constants import SmcccFilterAction
from pyvmm.errors import SmcccFilterError
from pyvmm.smccc import filter as f
from pyvmm.smccc.filter import FilterRange
from tests.unit.fakes import FakeVmFd

FWD = SmcccFilterAction.FWD_TO_USER


@pytest.mark.parametrize(("rng", "message"), [
    (FilterRange(0x8000_0000, 1, FWD), "reserves"),
    (FilterRange(0xC000_FFFF, 2, FWD), "reserves"),
    (FilterRange(0x7FFF_FFFF, 2, FWD), "reserves"),
    (FilterRange(0xFFFF_FFF0, 0x20, FWD), "wraps"),
    (FilterRange(0xC200_0000, 0, FWD), "at least one"),
])
def test_invalid_ranges(rng: FilterRange, message: str) -> None:
    with pytest.raises(SmcccFilterError, match=message):
        f.validate([rng])


def test_overlapping_ranges_name_both() -> None:
    a = FilterRange(0xC200_0000, 0x10, FWD, "a")
    b = FilterRange(0xC200_000F, 1, SmcccFilterAction.DENY, "b")
    with pytest.raises(SmcccFilterError, match=r"0xc200000f-0xc200000f deny \(b\): overlaps range 0xc2000000"):
        f.validate([a, b])


def test_adjacent_ranges_are_fine_and_installed_in_order() -> None:
    fd = FakeVmFd()
    f.install(fd, [FilterRange(0x8400_0000, 0x20, FWD), FilterRange(0x8400_0020, 0x20, FWD)])
    assert fd.installed == [(0x8400_0000, 0x20, 2), (0x8400_0020, 0x20, 2)]


def test_no_ranges_needs_no_filter_support() -> None:
    f.install(FakeVmFd(filter_supported=False), [])


def test_missing_filter_names_the_kernel_version() -> None:
    with pytest.raises(SmcccFilterError, match=r"needs Linux >= 6\.4, this host runs"):
        f.install(FakeVmFd(filter_supported=False), [FilterRange(0xC200_0000, 1, FWD)])


@pytest.mark.parametrize(("err", "words"), [
    (errno.EEXIST, "overlaps a range already installed"),
    (errno.EBUSY, "vCPU has already run"),
    (errno.EINVAL, "invalid"),
])
def test_kernel_refusals_are_translated(err: int, words: str) -> None:
    with pytest.raises(SmcccFilterError, match=words):
        f.install_range(FakeVmFd(filter_fails=err), FilterRange(0xC200_0000, 1, FWD, "x"))
