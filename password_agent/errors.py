"""The one exception type of :mod:`password_agent` (the agent and ``mandos-keygen``)."""


class AgentError(Exception):
    """An expected failure: unreadable key files, an unusable agent directory, a run that timed
    out with requests pending, a blob gpg cannot decrypt; for ``mandos-keygen``, a bad option
    value, existing keys, gpg refusing a key type, no terminal to prompt on.

    The message says what happened and what to do about it, on one line.  It never contains the
    password or any other secret.
    """
