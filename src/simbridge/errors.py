"""The root of simbridge's one exception tree.

Every package keeps its own errors in its own ``errors.py``; each class there derives from
:class:`SimbridgeError` and from the nearest builtin so callers can catch either.
"""


class SimbridgeError(Exception):
    """Base class of every error simbridge raises on purpose."""


class ConfigError(SimbridgeError, ValueError):
    """Raised when the configuration file or SIMBRIDGE_* variables are invalid; names the key and the fix."""
