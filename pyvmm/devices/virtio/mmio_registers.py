"""The virtio-mmio register layout, version 2 (virtio 1.2 §4.2.2), and where pyvmm puts its
devices: the numbers a driver and the transport (transport.py) agree on."""

VIRTIO_MMIO_BASE = 0x300_0000  # kvmtool's arm64 KVM_VIRTIO_MMIO_AREA
VIRTIO_MMIO_SIZE = 0x200  # kvmtool's per-device window: registers + configuration space
MAGIC = 0x7472_6976  # "virt"
VERSION = 2
VENDOR_ID = int.from_bytes(b"PYVM", "little")

# Registers (§4.2.2, table "MMIO Device Register Layout")
MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits (§2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 0x40, 0x80
# InterruptStatus bits (§4.2.2)
INT_USED_BUFFER, INT_CONFIG_CHANGE = 1, 2

# A device's interrupt in its device-tree node: an SPI, edge-triggered (an irqfd injects an edge,
# as kvmtool and QEMU declare it)
GIC_SPI, IRQ_TYPE_EDGE_RISING = 0, 1
