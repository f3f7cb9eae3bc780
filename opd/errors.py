"""Exceptions that the command line turns into one clear line instead of a traceback."""


class OPDError(Exception):
    """Base class: a problem the user can fix (bad config, missing file, bad data)."""


class ConfigError(OPDError, ValueError):
    """A config value is unknown, ill-typed, out of range or inconsistent with another."""


class ModelLoadError(OPDError):
    """A model or tokenizer could not be loaded (missing directory, offline hub, mismatch)."""


class DataError(OPDError):
    """A dataset could not be loaded or has malformed rows."""


class TrainingError(OPDError):
    """Training cannot go on (e.g. repeated non-finite losses)."""


class TrainingInterrupted(OPDError):
    """A stop signal (SIGTERM/SIGINT) ended training after a checkpoint was written.

    Attributes:
        signum: the signal number; the command line exits with 128 + signum.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
