# SPDX-License-Identifier: GPL-3.0-or-later
"""The one exception type of :mod:`password_agent` (the agent and ``mandos-keygen``), and the
one case of it that the agent's retries tell apart."""


class AgentError(Exception):
    """An expected failure: unreadable key files, an unusable agent directory, a run that timed
    out with requests pending, a blob gpg cannot decrypt; for ``mandos-keygen``, a bad option
    value, existing keys, gpg refusing a key type, no terminal to prompt on.

    The message says what happened and what to do about it, on one line.  It never contains the
    password or any other secret.
    """


class NetworkNotUp(AgentError):
    """Connecting failed for a reason of this host's own network, not the server's: no route
    yet, or the link-local address still in duplicate address detection.  Early in the boot
    this clears within a second or two, so the agent tries again soon instead of backing off
    further."""
