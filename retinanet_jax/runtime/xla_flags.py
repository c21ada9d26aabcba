"""XLA flags and the persistent compilation cache: the process-level settings that make RetinaNet fast.

XLA reads `$XLA_FLAGS` once, when JAX creates its first backend (the first `jax.devices()`, array or
compilation), so `apply_xla_flags` must run before that; importing jax earlier is fine. Flags that are
already in `$XLA_FLAGS` win over the ones added here, so a user's explicit choice is never overridden.

`CPU_FLAGS` is the measured best set for the CPU backend (docs/benchmarks.md, "Closing XLA's CPU gap",
records each flag's predicted and measured effect on the training step and inference). None of them
changes the model's numerics beyond float32 summation order: no fast-math, no bfloat16.

`enable_compilation_cache(path)` turns on JAX's persistent compilation cache, which removes the
compilation of a step from every start after the first (also measured in docs/benchmarks.md).
"""

from __future__ import annotations

import os
import shlex

import jax

# Convolutions through XLA's Eigen emitter instead of the YNNPACK library call. YNNPACK computes the
# weight gradient of a convolution as a convolution whose "feature" dimension is the batch (2 images):
# the activations are first transposed to [C, H, W, B] and the contraction then runs 2-wide, at a
# third of the machine's matrix-multiply rate. Eigen's convolution is a tiled GEMM with no such
# transposes. Measured on the R50-FPN training step: -20% CPU time; inference unchanged.
YNN_CONVOLUTION_OFF = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

CPU_FLAGS = (YNN_CONVOLUTION_OFF,)

# Flags that once helped and are now no-ops or gone; kept so that `apply_xla_flags` can drop them
# with a clear message instead of XLA printing a deprecation warning on every start.
DEPRECATED_FLAGS = ("--xla_cpu_use_thunk_runtime",)


def flag_name(flag: str) -> str:
  """'--xla_foo=1' -> '--xla_foo'."""
  return flag.split("=", 1)[0]


def merge_flags(current: str, extra) -> str:
  """`current` (an `$XLA_FLAGS` string) plus the flags of `extra` (a string or a sequence of flags)
  whose names are not in `current` already; deprecated flags are dropped from `extra`."""
  extra = shlex.split(extra) if isinstance(extra, str) else list(extra)
  present = {flag_name(f) for f in shlex.split(current)}
  added = [f for f in extra if flag_name(f) not in present and flag_name(f) not in DEPRECATED_FLAGS]
  return " ".join([current.strip()] + added).strip() if added else current.strip()


def backend_initialized() -> bool:
  """Whether JAX has created a backend (after which `$XLA_FLAGS` is no longer read)."""
  try:
    from jax._src import xla_bridge  # jax's private module, read only here  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  check = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(check()) if check is not None else False


def apply_xla_flags(extra=CPU_FLAGS, *, environ=None) -> str:
  """Adds `extra` to `$XLA_FLAGS` (see `merge_flags`) and returns the new value.

  Flags are per platform by name (`--xla_cpu_*` only affect the CPU backend), so the CPU set is safe
  to add on GPU and TPU hosts too. Raises RuntimeError if JAX's backend already exists and the value
  would change, since XLA would silently ignore it.
  """
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  merged = merge_flags(current, extra)
  if merged != current.strip():
    if environ is os.environ and backend_initialized():
      raise RuntimeError(f"XLA flags {extra!r} must be set before JAX initializes its backend; "
                         "call apply_xla_flags() before the first jax.devices() or computation")
    environ["XLA_FLAGS"] = merged
  return merged


def compilation_cache_dir(template: str, *, workdir: str, environ=None) -> str | None:
  """A run's persistent compilation cache directory: `template` (a config's
  `compilation_cache_dir`) with '{workdir}' replaced by the absolute `workdir`; None when `template`
  is '' or when $JAX_COMPILATION_CACHE_DIR already chose one (JAX reads that variable itself, with
  the other $JAX_PERSISTENT_CACHE_* settings, and it wins)."""
  environ = os.environ if environ is None else environ
  if not template or environ.get("JAX_COMPILATION_CACHE_DIR"):
    return None
  return template.replace("{workdir}", os.path.abspath(workdir))


def enable_compilation_cache(path: str, *, min_compile_time_secs: float = 1.0,
                             min_entry_size_bytes: int = 0) -> None:
  """JAX's persistent compilation cache in directory `path` (created if needed).

  Compilations that took at least `min_compile_time_secs` (and whose executable is at least
  `min_entry_size_bytes`) are written to `path`; a later process that compiles the same program with
  the same JAX/XLA version, flags and devices loads the executable instead of compiling it. The cache
  is trusted code: never point it at a directory others can write.
  """
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", min_entry_size_bytes)
