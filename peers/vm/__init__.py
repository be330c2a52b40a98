# SPDX-License-Identifier: GPL-3.0-or-later
"""The VM lab for the boot tests and the boot benchmark: images (kernel, LUKS disk, initramfs
with our module or upstream's), the qemu runner, the boot's console markers, a real LAN for a
VM, and a VM that boots a copy of the host's root."""
