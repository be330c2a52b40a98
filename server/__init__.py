# SPDX-License-Identifier: GPL-3.0-or-later
"""The Mandos server: hands each enabled, approved client its encrypted password blob over TLS
with raw public keys, wire-compatible with upstream Mandos 1.8."""
