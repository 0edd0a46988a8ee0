"""The error every user-facing failure in kvmkit derives from.

A `KvmkitError` message is one line that names the problem and, where there is
one, the fix. The CLI prints it as is, without a traceback.
"""


class KvmkitError(Exception):
    """A failure a user can act on; `str()` is the whole message."""


class ConfigError(KvmkitError):
    """Bad input: a machine configuration or command-line value that cannot work."""
