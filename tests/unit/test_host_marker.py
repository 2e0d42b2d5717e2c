"""The KVM tier's `host` marker (tests/conftest.py): which tests apply to which host shape."""

from __future__ import annotations

import pytest

from pyvmm.machine.host import HostShape
from tests.conftest import not_applicable

LINUX_61 = HostShape(kernel="6.1.0-28-arm64", gic=3, page_size=4096, max_ipa_bits=48, smccc_filter=False,
                     max_vcpus=512, nisv_to_user=True, guest_debug=True, hw_breakpoints=6, hw_watchpoints=4)
GICV2_16K = LINUX_61._replace(kernel="6.12.95+deb12-arm64-16k", gic=2, page_size=16384, smccc_filter=True)


def test_a_test_needing_the_filter_does_not_apply_without_it() -> None:
    mark = pytest.mark.host(smccc_filter=True, reason="SDEI needs the SMCCC filter (Linux >= 6.4)").mark
    assert not_applicable([mark], LINUX_61) == \
        "SDEI needs the SMCCC filter (Linux >= 6.4) (this host: smccc_filter=False)"
    assert not_applicable([mark], GICV2_16K) is None


def test_every_mark_must_hold_and_the_reason_defaults_to_what_it_needs() -> None:
    marks = [pytest.mark.host(page_size=4096).mark, pytest.mark.host(gic=3).mark]
    assert not_applicable(marks, LINUX_61) is None
    assert not_applicable(marks, GICV2_16K) == "needs page_size=4096 (this host: page_size=16384)"
    assert not_applicable([pytest.mark.host(gic=3).mark], GICV2_16K) == "needs gic=3 (this host: gic=2)"


def test_a_mark_that_names_no_host_property_is_a_usage_error() -> None:
    for mark in (pytest.mark.host(filter=True).mark, pytest.mark.host().mark, pytest.mark.host(True).mark):
        with pytest.raises(pytest.UsageError):
            not_applicable([mark], LINUX_61)
