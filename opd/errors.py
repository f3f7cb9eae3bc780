"""Exceptions that the command line turns into one clear line instead of a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


def unknown_key_error(key: str, valid: Iterable[str], section: str | None = None, owner: str | None = None) -> ConfigError:
    """``unknown config key 'trainer.lrr' (did you mean 'trainer.lr'?); valid keys of trainer: ...``.

    Args:
        key: the full dotted key as typed (``method.betaa``).
        valid: the keys the section accepts, without the section prefix.
        section: the section the key belongs to (``trainer``); None for a top-level key.
        owner: what decides the valid keys, when not the section alone (``method 'gkd'``).
    """
    valid = sorted(valid)
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(key.removeprefix(prefix), valid, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    where = f"keys of {owner or section}" if section else "top-level keys"
    return ConfigError(f"unknown config key {key!r}{hint}; valid {where}: {', '.join(valid)}")
