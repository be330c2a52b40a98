# SPDX-License-Identifier: GPL-3.0-or-later
"""The Mandos client side: a systemd password agent that answers disk-unlock requests with a
password fetched from a Mandos server (``mandos-password-agent``), the key generator
(``mandos-keygen``, in ``keygen/``) and the LUKS2 enrolment (``mandos-luks``, in ``luks/``).

The agent runs in the initramfs, so it imports only the standard library, ``inotify_simple``,
``python-gnupg``, ``sdnotify`` only when resident (``--watch``) and, only when it has to browse,
``zeroconf``.  ``keygen`` and ``luks`` run on the installed system (``cryptography``,
``cryptsetup``); the initramfs leaves both subpackages out.
"""
