# SPDX-License-Identifier: GPL-3.0-or-later
"""``mandos-keygen``: a Mandos client's keys, and clients.conf sections encrypted to them.

A subpackage so that the initramfs can leave it out whole: it needs ``cryptography`` and runs
on the installed system only.  ``cli`` is the command; ``files``, ``openpgp``, ``password`` and
``tls`` are its parts.
"""
