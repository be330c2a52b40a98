"""The one exception type of :mod:`password_agent`."""


class AgentError(Exception):
    """An expected failure of the password agent: unreadable key files, an unusable agent
    directory, a run that timed out with requests pending, a blob gpg cannot decrypt.

    The message says what happened and what to do about it, on one line.  It never contains the
    password or any other secret.
    """
