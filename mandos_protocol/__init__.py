# SPDX-License-Identifier: GPL-3.0-or-later
"""What the Mandos client and server share: the wire protocol, TLS with raw public keys, key ids
and durations, and the few process mechanics that both ends need done the same way (durable
file writes, sd_notify, no core dumps).  No configuration, no logging set-up and no policy
(what to write when, whom to retry) lives here: the callers decide."""
