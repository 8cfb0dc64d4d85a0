"""The errors a user can cause, reported by run.py without a traceback (exit status 2).

Everything else (a TensorFlow tracing error, a bug) keeps its traceback. Each class also derives
from the builtin it refines, so `except ValueError` / `except FileNotFoundError` still catch it.
"""


def first_line(error: BaseException) -> str:
  """The first line of an error's message (TensorFlow errors carry long op traces)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else ''


class UserError(Exception):
  """Base of the errors caused by flags, files or data; the message names the fix."""


class ConfigError(UserError, ValueError):
  """An invalid flag or combination of flags; the message names the flag and the fix."""


class DatasetError(ConfigError):
  """The dataset cannot serve the requested split/fraction; the message names the flag and fix."""


class BadImagesError(DatasetError):
  """Image files of a folder: dataset that cannot be decoded; the message names them."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A weights path that holds no checkpoint, export or SavedModel."""


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint does not fit the model; the message names the variables and the flags."""


class CheckpointUnreadableError(UserError, ValueError):
  """A weights path whose files are not a readable checkpoint (random bytes, truncated)."""
