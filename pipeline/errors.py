"""The project's user-facing error types.

A :class:`PipelineError` is a mistake the user can fix (a bad CSV, a wrong override, a missing
artifact). ``run.py`` prints it as one line, ``error: <message>``, and exits with code 2 instead of
showing a traceback. Anything else escaping a stage is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Base class of every user error; its message is a single line naming what and where."""


class DataError(PipelineError):
    """A competition file is missing or malformed (names the file, line and column)."""


class ConfigError(PipelineError):
    """A config value or override is invalid (names the key and what was expected)."""


class ArtifactError(PipelineError):
    """Cached folds, OOF or test predictions are missing, stale or inconsistent."""
