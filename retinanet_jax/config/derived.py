"""Config fields derived from another one, recomputed after the command line's overrides."""

from __future__ import annotations

import re

from retinanet_jax.data import synthetic as synthetic_lib


def synthetic_sizes(size: int) -> dict:
  """The data fields that `data.config.synthetic_data_config()` derives from the synthetic
  dataset's `image_size`: native size, no rescaling, padded to 128 (or 32 when 128 does not
  divide it)."""
  return {"train_min_size_range": (size, size), "eval_min_size": size, "max_size": size,
          "image_size": size, "pad_multiple": 32 if size % 128 else 128}


_SLICE = re.compile(r"^\s*(\w+)\s*\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\]\s*$")


def derive_fields(values: dict) -> list[str]:
  """Recomputes, in `values` (a config as nested dicts, after the command line's overrides), the
  fields derived from another one, and returns the problems of those that cannot agree.

  With the built-in synthetic dataset (`data.name == 'synthetic'`), the five input sizes
  (`synthetic_sizes`) follow `data.synthetic.image_size`: when they still hold the values derived
  from another size (a config file set them, then `--config.data.synthetic.image_size=64` changed
  the source), they are derived again from the new size. Sizes set to anything else are the user's
  choice (training at another size than the native one) and are kept. A split slice that reaches
  past the synthetic split's size (`validation[:16]` with `num_validation=8`) is a problem naming
  both fields (TFDS would fail later, deep in its reader).
  """
  data = values.get("data")
  if not isinstance(data, dict) or data.get("name") != "synthetic":
    return []
  synthetic = data.get("synthetic")
  if not isinstance(synthetic, dict):
    return []
  defaults = synthetic_lib.SyntheticConfig()
  size = synthetic.get("image_size", defaults.image_size)
  current = {k: (tuple(data[k]) if isinstance(data.get(k), (list, tuple)) else data.get(k))
             for k in synthetic_sizes(0)}
  old = current["eval_min_size"]
  if isinstance(old, int) and old != size and current == synthetic_sizes(old):
    data.update(synthetic_sizes(size))
  problems = []
  counts = {"train": synthetic.get("num_train", defaults.num_train),
            "validation": synthetic.get("num_validation", defaults.num_validation)}
  for field in ("train_split", "eval_split"):
    match = _SLICE.match(str(data.get(field, "")))
    if not match or match.group(1) not in counts:
      continue
    split, end = match.group(1), match.group(3)
    count_field = "num_train" if split == "train" else "num_validation"
    if end and not end.startswith("-") and int(end) > counts[split]:
      problems.append(f"data.{field}: {data[field]!r} reaches image {end} but the synthetic "
                      f"{split!r} split has data.synthetic.{count_field}={counts[split]} images; "
                      f"use {split}[:{counts[split]}] or less, or {split!r}")
  return problems

