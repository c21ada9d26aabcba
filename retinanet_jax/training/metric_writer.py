"""Where a run's numbers go: TensorBoard scalars, `workdir/metrics.jsonl`, the console and
`workdir/log.txt`, from process 0 only."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils



def _tensorflow():
  """TensorFlow (for TensorBoard), imported when a run first writes: importing this module (every
  `retinanet_jax.training` import) then costs no TensorFlow start-up."""
  import tensorflow as tf  # heavy, see the docstring  # pylint: disable=import-outside-toplevel
  return tf


class Writer:
  """TensorBoard scalars, `workdir/metrics.jsonl` (one JSON line of full-precision scalars per call)
  and a console line, from process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._writer = None
    self._log_path = os.path.join(workdir, "log.txt")
    self._metrics_path = os.path.join(workdir, "metrics.jsonl")
    if self.enabled:
      self._writer = _tensorflow().summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    tf = _tensorflow()
    with self._writer.as_default():
      for name, value in values.items():
        tf.summary.scalar(name, float(value), step=step)
    self._writer.flush()
    with open(self._metrics_path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")

  def log(self, message: str) -> None:
    """Prints on process 0 and appends to `workdir/log.txt`."""
    if self.enabled:
      print(message, flush=True)
      with open(self._log_path, "a") as f:
        f.write(message + "\n")


def input_stats(train_input) -> dict[str, int]:
  """The input counters (`data.InputStats`) summed over all hosts (a collective on several)."""
  stats = dataclasses.asdict(train_input.stats)
  if jax.process_count() > 1:
    values = multihost_utils.process_allgather(np.asarray(list(stats.values()), np.int32))
    stats = dict(zip(stats, np.asarray(values).reshape(jax.process_count(), -1).sum(0).tolist()))
  return stats


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
