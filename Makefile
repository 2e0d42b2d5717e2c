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

GUEST_SRCS := $(wildcard tests/guests/*.S examples/guests/*.S)
A32_SRCS := $(wildcard tests/guests/a32/*.S)
GUEST_BINS := $(patsubst %.S,build/guests/%.bin,$(notdir $(GUEST_SRCS))) \
              $(patsubst %.S,build/guests/%_smc.bin,$(notdir $(GUEST_SRCS))) \
              $(patsubst %.S,build/guests/a32/%.bin,$(notdir $(A32_SRCS))) \
              $(patsubst %.S,build/guests/a32/%_smc.bin,$(notdir $(A32_SRCS)))
# The GDB stub's test guests also as ELF files with their symbols, linked where pyvmm loads them
GUEST_ELFS := $(patsubst tests/guests/%.S,build/guests/%.elf,$(wildcard tests/guests/gdb_*.S))
BENCH_BINS := $(patsubst benchmarks/%.S,build/bench/%.bin,$(wildcard benchmarks/*.S))
vpath %.S tests/guests examples/guests

.PHONY: all test test-hosts lint unit kvm fuzz demo bench dist guests payloads host-deps venv armhost fresh-check clean
all: guests

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

# Guest payloads: flat AArch64 binaries assembled from .S with GNU as (cross on non-arm64 hosts).
guests: $(GUEST_BINS) $(GUEST_ELFS)
build/guests/%.elf: %.S tests/guests/common.inc | .cache/host-deps.stamp
	@mkdir -p $(@D)
	@$(CROSS)as -I tests/guests -o $(@:.elf=.elf.o) $<
	@$(CROSS)ld -Ttext=0x80000000 -o $@ $(@:.elf=.elf.o)
	@rm -f $(@:.elf=.elf.o)
# Each is built twice: NAME.bin makes its firmware calls with HVC, NAME_smc.bin with SMC.
build/guests/%_smc.bin: %.S tests/guests/common.inc | .cache/host-deps.stamp
	@mkdir -p $(@D)
	@$(CROSS)as -I tests/guests --defsym SMC=1 -o $(@:.bin=.o) $<
	@$(CROSS)objcopy -O binary $(@:.bin=.o) $@
	@rm -f $(@:.bin=.o)
build/guests/%.bin: %.S tests/guests/common.inc | .cache/host-deps.stamp
	@mkdir -p $(@D)
	@$(CROSS)as -I tests/guests -o $(@:.bin=.o) $<
	@$(CROSS)objcopy -O binary $(@:.bin=.o) $@
	@rm -f $(@:.bin=.o)

# The example project's payloads (examples/user_project/guests), for both conduits, in the
# payload cache its tests look in (build/pyvmm-payloads under its rootdir): the KVM tier runs them
# in the emulated arm64 host, which has no assembler, so they are assembled here first.
USER_PROJECT := examples/user_project
payloads: $(VENV)/.stamp
	@$(VPY) -m pyvmm.testing.payload build --cache $(USER_PROJECT)/build/pyvmm-payloads $(wildcard $(USER_PROJECT)/guests/*.S) >/dev/null

# AArch32 guests (for --aarch32 VMs), assembled by binutils' arm-linux-gnueabihf cross assembler.
build/guests/a32/%_smc.bin: tests/guests/a32/%.S tests/guests/a32/common32.inc | .cache/host-deps.stamp
	@mkdir -p $(@D)
	@arm-linux-gnueabihf-as -I tests/guests/a32 --defsym SMC=1 -o $(@:.bin=.o) $<
	@arm-linux-gnueabihf-objcopy -O binary $(@:.bin=.o) $@
	@rm -f $(@:.bin=.o)
build/guests/a32/%.bin: tests/guests/a32/%.S tests/guests/a32/common32.inc | .cache/host-deps.stamp
	@mkdir -p $(@D)
	@arm-linux-gnueabihf-as -I tests/guests/a32 -o $(@:.bin=.o) $<
	@arm-linux-gnueabihf-objcopy -O binary $(@:.bin=.o) $@
	@rm -f $(@:.bin=.o)

# Host-side AArch64 code for the benchmarks (the native floor loop), assembled the same way.
build/bench/%.bin: benchmarks/%.S | .cache/host-deps.stamp
	@mkdir -p $(@D)
	@$(CROSS)as -o $(@:.bin=.o) $<
	@$(CROSS)objcopy -O binary $(@:.bin=.o) $@
	@rm -f $(@:.bin=.o)

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

unit: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py guests
	@$(VPY) -m pytest -m "not kvm" -q

# The KVM tier: every test marked `kvm`, against real /dev/kvm; a skipped one fails the tier.
# --capture=sys leaves fd 2 alone, so a stuck test's watchdog dump (faulthandler) is seen.
kvm: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py guests payloads armhost
	@$(call on_kvm,$(ARMHOST_TIMEOUT),env PYVMM_KVM_TIER=1 $(KVM_PY) -m pytest -m kvm -q -rfEs --color=no --capture=sys --durations=12)

test: lint unit kvm

# The KVM tier once in each emulated host shape (tools/armhost/shapes.py: GICv3 with 4K pages on
# Linux 6.12, GICv2, 16K pages, Linux 6.1), one boot each, then one line per shape with its tally.
# Emulated on every machine, native arm64 ones too: a real host is one shape, the matrix all four.
test-hosts: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py guests payloads armhost
	@$(ARMHOST) matrix --timeout $(ARMHOST_TIMEOUT) -- env PYVMM_KVM_TIER=1 python3 -m pytest -m kvm -q -rfEs --color=no --capture=sys --durations=12

# The fuzz campaigns in full (`make test` runs a share of each): a hostile driver against every
# virtio device, malformed CLI values, broken service modules, handler results and control-socket
# bytes on this host; random SMCCC calls from real guests over both conduits in the KVM tier.
# Each prints its tallies (counts, RSS). About 17 minutes on a 2-core x86 machine.
fuzz: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py guests armhost
	@PYVMM_FUZZ=1 $(VPY) -m pytest -m "fuzz and not kvm" -q
	@$(call on_kvm,2400,env PYVMM_FUZZ=1 PYVMM_KVM_TIER=1 $(KVM_PY) -m pytest -m "fuzz and kvm" -q -rfEs --color=no --capture=sys)

# The demo: Linux boots with PSCI and SDEI serviced (and traced) in Python and reads a virtio disk
# and virtio entropy, an assembled guest calls a Python SMCCC service over HVC and over SMC, and
# another receives SDEI events; `pyvmm exec` runs host commands in a Linux guest on the host's root.
demo: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py guests armhost
	@$(call on_kvm,500,sh -c "$(KVM_PY) examples/boot_linux.py && $(KVM_PY) examples/smccc_demo.py && $(KVM_PY) examples/sdei_demo.py && $(KVM_PY) examples/exec_demo.py")

bench: $(VENV)/.stamp kvm_bindings/_kvm_ffi.py guests $(BENCH_BINS) armhost
	@$(call on_kvm,900,$(KVM_PY) -m benchmarks)

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
