"""Expected failures and the exit codes the scripts end with.

A failure the user can act on (a bad flag or config value, a missing dataset, a damaged checkpoint, a
run stopped by a guard, an output that would be overwritten) ends a script with one paragraph on
stderr, `error: ...`, and the exit code of its kind; no traceback. Anything else is a bug or an
environment problem nobody foresaw: its traceback is kept (exit code 1, Python's).

    code  kind        raised as
    0     success
    1     unexpected  any other exception (with its traceback)
    2     usage       bad flags or arguments, invalid config values (`typed_config.ConfigError`)
    3     data        dataset missing or malformed (`FileNotFoundError`, `coco_format.CocoFormatError`,
                      TFDS's "could not find data", scripts/prepare_dataset.py's fatal problems,
                      `results_file.ResultsFileError`: a results file that cannot be scored)
    4     checkpoint  checkpoint missing, damaged, or of another model (`checkpoints.CheckpointError`)
    5     training    training stopped by a guard: a non-finite loss, or divergence with
                      `train.on_divergence='stop'` (`TrainingStopped`)
    6     output      a file the command would write already exists (`FileExistsError`)

The library's own error classes inherit from `KnownError` and carry their `exit_code`; the few foreign
types above are mapped by `exit_code_of`. `run(main)` is `absl.app.run` with both: every script's
entry point.
"""

from __future__ import annotations

import sys
import textwrap
from typing import Callable, Optional

from absl import app, flags

from retinanet_jax.runtime import console

SUCCESS = 0
UNEXPECTED = 1
USAGE = 2
DATA = 3
CHECKPOINT = 4
TRAINING = 5
OUTPUT = 6

EXIT_CODES = {SUCCESS: "success", UNEXPECTED: "unexpected error (traceback printed)",
              USAGE: "bad flags, arguments or config values", DATA: "dataset missing or malformed",
              CHECKPOINT: "checkpoint missing, damaged or of another model",
              TRAINING: "training stopped by a guard (non-finite loss, divergence)",
              OUTPUT: "a file to write already exists (nothing is overwritten)"}


class KnownError(Exception):
  """An expected failure: its message says what happened and what to do; scripts exit with
  `exit_code` and no traceback."""

  exit_code = UNEXPECTED


class TrainingStopped(KnownError, RuntimeError):
  """Training stopped by a guard (non-finite loss, divergence); the message names the step and the
  checkpoint to resume from."""

  exit_code = TRAINING


def exit_code_of(error: BaseException) -> Optional[int]:
  """The exit code of an expected failure, or None for an unexpected one (module docstring)."""
  if isinstance(error, KnownError):
    return error.exit_code
  if isinstance(error, app.UsageError):
    return USAGE
  if isinstance(error, FileExistsError):
    return OUTPUT
  if isinstance(error, FileNotFoundError):
    return DATA
  if _tfds_missing_data(error):
    return DATA
  names = {f"{c.__module__}.{c.__qualname__}" for c in type(error).__mro__}
  if names & {"retinanet_jax.data.coco_format.CocoFormatError",
              "tensorflow_datasets.core.registered.DatasetNotFoundError"}:
    return DATA
  return None


def _tfds_missing_data(error: BaseException) -> bool:
  """TFDS's `as_dataset` on a dataset that was never prepared in `data_dir` raises a bare
  AssertionError ("Dataset coco: could not find data in DIR. ...")."""
  return isinstance(error, AssertionError) and "could not find data in" in str(error)


def paragraph(error: BaseException) -> str:
  """`error: <message>` for the console: the message's lines kept, long ones wrapped at 100."""
  text = str(error).strip()
  if _tfds_missing_data(error):
    text = (text.split(". Please make sure")[0] + ". Prepare it first (COCO: `tfds build "
            "coco/2017 --data_dir=DIR`; your own data: scripts/prepare_dataset.py), or point "
            "--config.data.data_dir at the folder that holds it.")
  lines = text.splitlines() or [type(error).__name__]
  out = []
  for i, line in enumerate(lines):
    indent = line[:len(line) - len(line.lstrip())]
    out += textwrap.wrap(line, 100, initial_indent="error: " if i == 0 else "",
                         subsequent_indent=indent + "  ", break_on_hyphens=False,
                         break_long_words=False) or [""]
  return "\n".join(out)


def report(error: BaseException, code: int) -> None:
  """Prints `paragraph(error)` to stderr (and to `workdir/log.txt` when the console has one)."""
  text = paragraph(error)
  console.to_log_file(text + f"\n(exit code {code})")
  print(text, file=sys.stderr, flush=True)


def _parse_flags(argv):
  """absl's flag parsing, exiting with `USAGE` (not 1) on a bad flag or config override."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if "Traceback (most recent call last)" in message:  # ml_collections quotes a config file's
      lines = [l for l in message.splitlines() if l.strip()]
      message = f"{lines[0]} {lines[-1]}"  # traceback: keep its first and last lines
    print(f"error: {message}\nPass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(USAGE)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections' --config.X
    details = str(e).strip("\"'")
    print(f"error: cannot apply the command line flags ({type(e).__name__}: {details!r}); a "
          f"--config.SECTION.FIELD override must name an existing field of the config "
          f"(retinanet_jax/config/) and give a value of its type.", file=sys.stderr)
    sys.exit(USAGE)


def run(main: Callable) -> None:
  """`absl.app.run(main)`, where an expected failure (`exit_code_of`) ends with its paragraph and
  exit code instead of a traceback. Unexpected exceptions propagate (traceback, exit code 1)."""
  def wrapped(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      code = exit_code_of(e)
      if code is None:
        raise
      report(e, code)
      if code == USAGE and isinstance(e, app.UsageError):
        print("Pass --helpfull to see the flags.", file=sys.stderr)
      sys.exit(code)

  app.run(wrapped, flags_parser=_parse_flags)
