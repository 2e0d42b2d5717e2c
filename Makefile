# pyvmm: `make test` and `make demo` are all a fresh Debian machine needs (run as root).
#
# On an arm64 host with /dev/kvm the KVM tier runs natively. Anywhere else it runs inside an
# emulated arm64 KVM host (qemu-system-aarch64, TCG, virtualization=on), built once and cached
# under .cache/ (git-ignored), booted once per `make` target.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
ARCH := $(shell uname -m)
NATIVE_KVM := $(shell [ "$(ARCH)" = aarch64 ] && [ -e /dev/kvm ] && echo yes)
CROSS := $(if $(filter aarch64,$(ARCH)),,aarch64-linux-gnu-)
ARMHOST := $(VPY) tools/armhost
ARMHOST_TIMEOUT ?= 1500
export PYTHONDONTWRITEBYTECODE := 1
# $(call on_kvm,SECONDS,COMMAND): COMMAND against real /dev/kvm, here on an arm64 host with KVM, else
# in the emulated arm64 host (one boot, at most SECONDS), where pyvmm's Python is python3
KVM_PY = $(if $(NATIVE_KVM),$(VPY),python3)
on_kvm = $(if $(NATIVE_KVM),,$(ARMHOST) run --timeout $(1) --) $(2)

# Guest payloads (pyvmm/testing/payload.py assembles them into the payload cache, where the pytest
# plugin, the examples and the benchmarks find them): the test guests, the examples', the example
# project's (in its own cache, under its rootdir) and the benchmarks' native loops
PAYLOADS := build/pyvmm-payloads
USER_PROJECT := examples/user_project
BUILD_PAYLOADS := $(VPY) -m pyvmm.testing.payload build

.PHONY: all test test-hosts lint unit kvm fuzz demo bench dist payloads host-deps venv armhost fresh-check clean
all: payloads

host-deps: .cache/host-deps.stamp
.cache/host-deps.stamp: tools/host-deps.sh
	@PYTHON=$(PYTHON) bash tools/host-deps.sh
	@mkdir -p $(@D) && touch $@

# --use-pep517: Debian 12's venvs have pip 23.0.1, which would install a setup.py-only sdist (pyfdt)
# the deprecated legacy way; newer pips always build it with PEP 517, so every pip does the same.
venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml | .cache/host-deps.stamp
	@echo "venv: installing pyvmm and its development dependencies into $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(VPY) -m pip install -q --disable-pip-version-check --use-pep517 -e '.[dev]'
	@touch $@

kvm_bindings/_kvm_ffi.py: kvm_bindings/cdef_*.py kvm_bindings/ffi_build.py | $(VENV)/.stamp
	@rm -f $@ && $(VPY) -m kvm_bindings.ffi_build >/dev/null

# Every payload is built for both conduits (the SMC build defines `SMC`: pyvmm.inc's
# firmware_call), once: the cache is named by the sources' contents, so this is quick when nothing
# changed. The emulated arm64 host has no assembler: the KVM tier finds the builds made here.
payloads: $(VENV)/.stamp | .cache/host-deps.stamp
	@$(BUILD_PAYLOADS) --cache $(PAYLOADS) $(wildcard tests/guests/*.S examples/guests/*.S benchmarks/*.S) >/dev/null
	@$(BUILD_PAYLOADS) --cache $(PAYLOADS) --arch aarch32 $(wildcard tests/guests/a32/*.S) >/dev/null
	@$(BUILD_PAYLOADS) --cache $(USER_PROJECT)/$(PAYLOADS) $(wildcard $(USER_PROJECT)/guests/*.S) >/dev/null

# The emulated arm64 host (off arm64), and the Linux guest images (everywhere): both are built by
# tools/armhost from Debian's arm64 packages and cached in .cache/armhost.
armhost guest-images: $(VENV)/.stamp
	@$(ARMHOST) build

# ruff, and mypy in strict mode over every Python file (pyproject.toml [tool.mypy]); the GitHub
# workflow against the schema vendored in check-jsonschema (no network)
lint: $(VENV)/.stamp
	@$(VPY) -m ruff check .
	@$(VPY) -m mypy
	@$(VPY) -m check_jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

# PYVMM_REQUIRE_QSD: host-deps installed qemu-storage-daemon, so its tests run here, never skip
unit: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py
	@PYVMM_REQUIRE_QSD=1 $(VPY) -m pytest -m "not kvm" -q

# The KVM tier: every test marked `kvm`, against real /dev/kvm; a skipped one fails the tier.
# --capture=sys leaves fd 2 alone, so a stuck test's watchdog dump (faulthandler) is seen.
kvm: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py payloads armhost
	@$(call on_kvm,$(ARMHOST_TIMEOUT),env PYVMM_KVM_TIER=1 $(KVM_PY) -m pytest -m kvm -q -rfEs --color=no --capture=sys --durations=12)

test: lint unit kvm

# The KVM tier once in each emulated host shape (tools/armhost/shapes.py: GICv3 with 4K pages on
# Linux 6.12, GICv2, 16K pages, Linux 6.1), one boot each, then one line per shape with its tally.
# Emulated on every machine, native arm64 ones too: a real host is one shape, the matrix all four.
test-hosts: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py payloads armhost
	@$(ARMHOST) matrix --timeout $(ARMHOST_TIMEOUT) -- env PYVMM_KVM_TIER=1 python3 -m pytest -m kvm -q -rfEs --color=no --capture=sys --durations=12

# The fuzz campaigns in full (`make test` runs a share of each): a hostile driver against every
# virtio device, malformed CLI values, broken service modules, handler results and control-socket
# bytes on this host; random SMCCC calls from real guests over both conduits in the KVM tier.
# Each prints its tallies (counts, RSS). About 17 minutes on a 2-core x86 machine.
fuzz: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py payloads armhost
	@PYVMM_FUZZ=1 $(VPY) -m pytest -m "fuzz and not kvm" -q
	@$(call on_kvm,2400,env PYVMM_FUZZ=1 PYVMM_KVM_TIER=1 $(KVM_PY) -m pytest -m "fuzz and kvm" -q -rfEs --color=no --capture=sys)

# The demo: Linux boots with PSCI and SDEI serviced (and traced) in Python and reads a virtio disk
# and virtio entropy, an assembled guest calls a Python SMCCC service over HVC and over SMC, and
# another receives SDEI events; `pyvmm exec` runs host commands in a Linux guest on the host's root.
demo: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py payloads armhost
	@$(call on_kvm,500,sh -c "$(KVM_PY) examples/boot_linux.py && $(KVM_PY) examples/smccc_demo.py && $(KVM_PY) examples/sdei_demo.py && $(KVM_PY) examples/exec_demo.py")

bench: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py payloads armhost
	@$(call on_kvm,1800,$(KVM_PY) -m benchmarks)

# The two commands above on a truly fresh Debian of each release the README promises: a new
# debootstrap'd root with a clean clone of HEAD, `make demo` and `make test` run in it (as root,
# in a chroot, clean environment), for Debian 12 (bookworm) then 13 (trixie); RELEASES=13 checks
# one. Slow (everything is downloaded and built again, about 25 minutes a release), so not part
# of `make test`. KEEP=1 keeps the roots.
RELEASES ?= 12 13
fresh-check:
	@KEEP=$(KEEP) bash tools/fresh-check.sh $(RELEASES)

# The sdist and the wheel, in dist/: the wheel carries the generated FFI module (setup.py).
dist: $(VENV)/.stamp
	@$(VPY) -m build --outdir dist . >/dev/null && ls dist

clean:
	rm -rf build dist kvm_bindings/_kvm_ffi.py
