# SPDX-License-Identifier: GPL-3.0-or-later
"""The VM tests: boots under qemu, built with the lab in :mod:`peers.vm`."""
