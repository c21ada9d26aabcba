"""What goes wrong when a saved model is read: the errors (exit code 4) and their one line of cause."""

from __future__ import annotations

import re
from typing import Optional

from retinanet_jax.runtime import errors


class CheckpointError(errors.KnownError, ValueError):
  """A checkpoint that cannot be read as asked; the message says which path and what to do. Scripts
  exit with `errors.CHECKPOINT` (4)."""

  exit_code = errors.CHECKPOINT


class DamagedCheckpointError(CheckpointError):
  """A checkpoint whose files cannot be read back (truncated, cut short, corrupted): the message
  names the step and the folder. `step` is None for converted weights."""

  def __init__(self, message: str, *, path: str, step: Optional[int] = None):
    super().__init__(message)
    self.path, self.step = path, step



_STATUS = re.compile(r"\b(?:OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|FAILED_PRECONDITION|"
                     r"UNKNOWN|INTERNAL|PERMISSION_DENIED): [^\n]*")


def first_line(error: BaseException) -> str:
  """The line of `error` (or of the errors it was raised from) that says what failed: a storage
  status line ("OUT_OF_RANGE: Error reading ... in OCDBT database ...") when there is one."""
  chain, seen = [], error
  while seen is not None and len(chain) < 5:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for e in chain:
    match = _STATUS.search(str(e))
    if match:
      line = match.group(0)
      break
  else:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
  return line if len(line) <= 300 else line[:297] + "..."

