# SPDX-License-Identifier: GPL-3.0-or-later
"""The VM boot test: images (kernel, LUKS disk, initramfs with our module) and the qemu runner."""
