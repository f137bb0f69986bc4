"""Bad input whose message is the whole story: what is wrong and how to fix it.

The entry points (`mae_jax.core.entry`) print such an error without a traceback and exit with
status 2 (bad input). Each class also derives from the builtin a caller would catch
(FileNotFoundError, ValueError, RuntimeError), so `except FileNotFoundError` still works.
"""

from __future__ import annotations


class BadInputError(Exception):
    """Base: the message names the problem and the fix."""


class DataNotFoundError(BadInputError, FileNotFoundError):
    """A dataset, folder or archive that is not where the config says."""


class BadDataError(BadInputError, ValueError):
    """Data that is there but cannot be used as given (no images, a damaged archive, ...)."""


class DataUnavailableError(BadInputError, RuntimeError):
    """A dataset that could not be downloaded or prepared (e.g. no network)."""


class CheckpointMismatchError(BadInputError, ValueError):
    """A checkpoint that does not fit the config (another model size or optimizer)."""


class WeightsError(BadInputError, ValueError):
    """A weights file or run that cannot be read, or does not fit the model it is loaded into."""
