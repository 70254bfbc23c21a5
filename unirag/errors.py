"""User-facing errors: the CLI and the app print these as messages, never as tracebacks."""


class UniragError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""


class DataError(UniragError):
    """Malformed corpus or question file."""


class MissingDependencyError(UniragError):
    """A package or embedded model file is not installed."""


class FingerprintMismatchError(UniragError):
    """An artefact on disk was built from different data or a different model."""
