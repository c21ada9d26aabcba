"""What a person sees on the console, and where the libraries' chatter goes instead.

By default the scripts print only this project's own lines (config summary, training steps,
evaluation tables, warnings, errors). The other libraries' log lines (Orbax's checkpoint internals,
TensorFlow Datasets, JAX's backend probes, absl) go to the run's log file, `workdir/log.txt`, when
there is one, and nowhere otherwise; library records at ERROR or above still reach the console,
except the tracebacks of a failed checkpoint read that our own error paragraph already reported.
TensorFlow's native start-up banners are turned off (`TF_CPP_MIN_LOG_LEVEL=2`), TFDS's stdout lines
("Downloading and preparing dataset ...") go to the log file, and its tqdm bars become one updating
progress line. `--verbose` shows everything, as the libraries print it.

The progress line (`progress`, `ProgressLine`) is drawn on stderr and only when stderr is a terminal:
logs and pipes never receive carriage returns.

    console.quiet_native_logs()            # at the top of a script, before TensorFlow is imported
    console.setup(verbose=FLAGS.verbose, log_path=os.path.join(workdir, "log.txt"))
    for batch in console.progress(batches, desc="evaluating", total=n): ...
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Iterable, Iterator, Optional

from absl import logging as absl_logging

_state = {"log_path": None, "verbose": False, "file_handler": None, "native_lines": ""}


def quiet_native_logs(argv: Optional[list[str]] = None) -> None:
  """Keeps TensorFlow's native start-up lines off the console unless `--verbose` is in `argv`
  (default `sys.argv`): sets `TF_CPP_MIN_LOG_LEVEL=2` (unless set) and imports TensorFlow with the
  process's stderr (file descriptor 2) sent to a buffer, because TensorFlow 2.21 prints its oneDNN
  banner through absl's C++ logging before any level applies; `setup(log_path=...)` then writes
  those lines to the log file. Scripts call it first thing, before their flags are parsed (a config
  file imports TensorFlow)."""
  argv = sys.argv if argv is None else argv
  verbose = {a.lower() for a in argv} & {"--verbose", "--verbose=true", "--verbose=1"}
  if verbose or "tensorflow" in sys.modules:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as buffer:
    os.dup2(buffer.fileno(), 2)
    try:
      # The point of this function: TensorFlow imported with its start-up lines captured.
      import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      pass
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      buffer.seek(0)
      _state["native_lines"] = buffer.read().decode(errors="replace")


def setup(*, verbose: bool = False, log_path: Optional[str] = None) -> None:
  """Routes the libraries' logging: to `log_path` (appended; every level from INFO), and to the
  console only at ERROR or above unless `verbose`. Replaces TFDS's progress bars by one progress
  line. May be called again (a script learns its workdir late)."""
  _state["verbose"], _state["log_path"] = verbose, log_path
  root = logging.getLogger()
  absl_logging.set_verbosity(absl_logging.INFO if (verbose or log_path) else absl_logging.ERROR)
  absl_logging.get_absl_handler().setLevel(logging.NOTSET if verbose else logging.ERROR)
  if absl_logging.get_absl_handler() not in root.handlers:
    root.addHandler(absl_logging.get_absl_handler())
  old = _state["file_handler"]
  if old is not None:
    root.removeHandler(old)
    old.close()
    _state["file_handler"] = None
  if log_path:
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    handler = logging.FileHandler(log_path, mode="a")
    handler.setFormatter(absl_logging.PythonFormatter())
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    _state["file_handler"] = handler
    if _state["native_lines"].strip():
      to_log_file(_state["native_lines"])
      _state["native_lines"] = ""
  for name in ("jax", "jax._src.xla_bridge", "orbax", "absl", "tensorflow"):
    logging.getLogger(name).setLevel(logging.NOTSET)  # their records reach the root's handlers
  console_handler = absl_logging.get_absl_handler()
  for existing in [f for f in console_handler.filters if isinstance(f, _CheckpointReadLeftovers)]:
    console_handler.removeFilter(existing)
  if not verbose:
    console_handler.addFilter(_CheckpointReadLeftovers())
    _single_line_tfds_progress()
    if not getattr(sys.unraisablehook, "_retinanet_console", False):
      sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


class _CheckpointReadLeftovers(logging.Filter):
  """Keeps off the console (not out of the log file) the log records that carry the traceback of a
  failed checkpoint read, once the damaged checkpoint has been reported in our own paragraph:
  asyncio's "Task exception was never retrieved" for orbax's abandoned read tasks, and any record
  whose exception passed through orbax's or tensorstore's files."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and _raised_in_checkpoint_io(record.exc_info[2]):
      return False
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except  (a malformed record: let it through)
      return True
    return not ("Traceback (most recent call last)" in message
                and ("/orbax/" in message or "/tensorstore/" in message))


def _quiet_unraisable(default):
  """A `sys.unraisablehook` that sends the late leftovers of a failed checkpoint read to the log
  file: tensorstore's callbacks ("RuntimeError: Event loop is closed") and orbax's read coroutines
  that are collected after the read was abandoned ("Exception ignored in: <coroutine
  _read_array_index_and_device_put>", dozens of tracebacks once a damaged checkpoint has been
  reported, at a moment set by the garbage collector). Every other unraisable exception goes to
  `default`."""

  def hook(unraisable):
    error = unraisable.exc_value
    if ((isinstance(error, RuntimeError) and str(error) == "Event loop is closed")
        or _raised_in_checkpoint_io(unraisable.exc_traceback)):
      to_log_file(f"(ignored after a failed read) {type(error).__name__}: {error}")
      return
    default(unraisable)

  hook._retinanet_console = True  # pylint: disable=protected-access
  return hook


def _raised_in_checkpoint_io(traceback) -> bool:
  """Whether a traceback passes through orbax's or tensorstore's files."""
  while traceback is not None:
    filename = traceback.tb_frame.f_code.co_filename.replace(os.sep, "/")
    if "/orbax/" in filename or "/tensorstore/" in filename:
      return True
    traceback = traceback.tb_next
  return False


def to_log_file(text: str) -> None:
  """Appends `text` to the log file of `setup`, if any."""
  if _state["log_path"]:
    with open(_state["log_path"], "a") as f:
      f.write(text.rstrip("\n") + "\n")


@contextlib.contextmanager
def library_stdout() -> Iterator[None]:
  """Inside: what libraries `print` (TFDS's "Downloading and preparing ...") goes to the log file
  (or nowhere), not the console; unchanged with `verbose`."""
  if _state["verbose"]:
    yield
    return
  buffer = io.StringIO()
  try:
    with contextlib.redirect_stdout(buffer):
      yield
  finally:
    if _TqdmLine._line is not None:  # pylint: disable=protected-access
      _TqdmLine._line.done()  # pylint: disable=protected-access
    if buffer.getvalue().strip():
      to_log_file(buffer.getvalue())


# ----------------------------------------------------------------------------------------------
# One progress line


class ProgressLine:
  """A single line on stderr, rewritten in place (`\\r`), at most 10 times a second; drawn only when
  stderr is a terminal. `done()` erases it."""

  _lock = threading.RLock()

  def __init__(self, stream=None):
    self.stream = stream or sys.stderr
    self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
    self._last = 0.0
    self._shown = False

  def show(self, text: str, *, force: bool = False) -> None:
    if not self.enabled:
      return
    now = time.monotonic()
    if not force and now - self._last < 0.1:
      return
    self._last = now
    width = 100
    with self._lock:
      self.stream.write("\r" + text[:width - 1] + "\x1b[K")
      self.stream.flush()
      self._shown = True

  def done(self) -> None:
    if self.enabled and self._shown:
      with self._lock:
        self.stream.write("\r\x1b[K")
        self.stream.flush()
      self._shown = False


def _count(n: int, total: Optional[int], unit: str) -> str:
  return f"{n}/{total} {unit}" if total else f"{n} {unit}"


def format_duration(seconds: float) -> str:
  """`42 s`, `3 min 05 s`, `2 h 07 min`."""
  seconds = max(int(round(seconds)), 0)
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _status(desc: str, n: int, total: Optional[int], unit: str, elapsed: float) -> str:
  """`desc: n/total unit (p%), r unit/s, ETA t`: the rate and ETA once an item is done."""
  text = f"{desc}: {_count(n, total, unit)}"
  if total:
    text += f" ({100 * n // total}%)"
  if n and elapsed > 0:
    rate = n / elapsed
    text += f", {rate:.2f} {unit}/s" if rate < 10 else f", {rate:.0f} {unit}/s"
    if total and n < total:
      text += f", ETA {format_duration((total - n) / rate)}"
  return text


def progress(iterable: Iterable, *, desc: str, total: Optional[int] = None,
             unit: str = "batches", every_seconds: float = 30.0, stream=None,
             clock=time.monotonic) -> Iterator:
  """Yields `iterable`'s items while reporting progress as `desc: n/total unit (p%), rate, ETA`.

  On a terminal: one line, rewritten in place (`ProgressLine`). Anywhere else (a pipe, a log
  file): a plain line every `every_seconds` (none for work that ends sooner), also appended to the
  log file set by `setup`, and a last line at the end if any was written. `stream`: stderr by
  default; `clock`: for tests."""
  stream = stream or sys.stderr
  line = ProgressLine(stream)
  n, began = 0, clock()
  last_written, wrote = began, False
  try:
    line.show(_status(desc, n, total, unit, 0.0), force=True)
    for item in iterable:
      yield item
      n += 1
      now = clock()
      text = _status(desc, n, total, unit, now - began)
      if line.enabled:
        line.show(text)
      elif now - last_written >= every_seconds:
        print(text, file=stream, flush=True)
        to_log_file(text)
        last_written, wrote = now, True
    if wrote:
      text = f"{_status(desc, n, total, unit, clock() - began)} in {format_duration(clock() - began)}"
      print(text, file=stream, flush=True)
      to_log_file(text)
  finally:
    line.done()


class _TqdmLine:
  """The part of `tqdm.tqdm` that TFDS uses, drawn as the one progress line (nested bars share it:
  the line shows the latest update)."""

  _lock = threading.RLock()
  _line: Optional[ProgressLine] = None

  def __init__(self, iterable=None, desc=None, total=None, unit="it", **_):
    self.iterable, self.desc, self.unit, self.n = iterable, desc or "", unit.strip(), 0
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
      total = len(iterable)
    self.total = total
    if _TqdmLine._line is None:
      _TqdmLine._line = ProgressLine()
    self.refresh()

  @classmethod
  def get_lock(cls):
    return cls._lock

  @staticmethod
  def write(s, file=None, end="\n", **_):
    (file or sys.stderr).write(str(s) + end)

  def __iter__(self):
    try:
      for item in self.iterable:
        yield item
        self.update(1)
    finally:
      self.close()

  def __len__(self):
    return self.total or 0

  def update(self, n=1):
    self.n += n
    self.refresh(force=False)

  def refresh(self, force=True, **_):
    label = self.desc.rstrip(": .")
    if len(label) > 60:
      label = label[:57] + "..."
    self._line.show(f"{label}: {_count(self.n, self.total, self.unit)}", force=force)

  def set_description(self, desc=None, **_):
    self.desc = desc or ""

  def clear(self, *_, **__):
    pass

  def close(self):
    self._line.done()

  def __enter__(self):
    return self

  def __exit__(self, *_):
    self.close()


def _single_line_tfds_progress() -> None:
  """TFDS draws its bars through `tqdm_utils.tqdm_lib.tqdm`; give it `_TqdmLine` instead (or turn
  the bars off if that module changed)."""
  try:
    from tensorflow_datasets.core.utils import tqdm_utils  # heavy (TFDS): only with a dataset  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  if hasattr(tqdm_utils, "tqdm_lib"):
    tqdm_utils.tqdm_lib = type("SingleLineTqdm", (), {"tqdm": _TqdmLine})
  else:
    tqdm_utils.disable_progress_bar()
