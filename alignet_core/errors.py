"""The project's error hierarchy: every message names the field or path and what was expected."""


class AlignetError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(AlignetError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class InputError(AlignetError, ValueError):
    """A file or array handed in by the user is unreadable or malformed."""


class StoreError(AlignetError, RuntimeError):
    """An artifact store is missing, incomplete or inconsistent with what was asked."""


class DistributedError(AlignetError, RuntimeError):
    """A rank of a data-parallel run died or failed without an error of its own (killed, out of memory)."""
