# SPDX-License-Identifier: GPL-3.0-or-later
"""The one exception type of :mod:`mandos_protocol`."""


class ProtocolError(Exception):
    """An expected failure of the protocol layer: a bad protocol line, a TLS failure, a peer
    without a raw public key, a missing or too old libgnutls, an unparseable duration.

    The message says what happened in words a user can act on.  It never contains secret data.
    """
