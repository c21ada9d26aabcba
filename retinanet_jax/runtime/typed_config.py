"""Frozen-dataclass config sections and their two-way bridge to `ml_collections.ConfigDict`.

The command line speaks `ml_collections` (`--config=configs/x.py --config.loss.gamma=1`); the library
reads frozen dataclasses, one per section (`retinanet_jax.config`). This module is the bridge:

* `to_config_dict(section)`: the `ConfigDict` of a dataclass's values (nested dataclasses become
  nested `ConfigDict`s; a `None` string field becomes a typed placeholder, so that the command line
  can set it; fields marked `metadata={"derived": True}` are left out).
* `from_mapping(cls, mapping, prefix=...)`: a dataclass from a `ConfigDict` or dict, after checking
  every field at once: unknown names, values outside a field's `metadata["choices"]`, lists given
  for tuples. It raises one `ConfigError` that lists every problem, each naming the field with its
  full path (`loss.normalizer`), the value and the allowed values; then the dataclass's own
  `__post_init__` checks run (their `ValueError`s are reported with the section's name).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from retinanet_jax.runtime import errors


class ConfigError(errors.KnownError, ValueError):
  """Invalid config values. `problems` lists each one; the message holds them all. Scripts exit with
  `errors.USAGE` (2)."""

  exit_code = errors.USAGE

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    super().__init__("invalid config:\n  " + "\n  ".join(self.problems))


def choices(field: dataclasses.Field) -> tuple | None:
  """The allowed values of a dataclass field, or None when any value of its type is allowed."""
  return field.metadata.get("choices")


def _is_section(value) -> bool:
  return dataclasses.is_dataclass(value) and not isinstance(value, type)


def to_config_dict(section) -> ml_collections.ConfigDict:
  """The `ConfigDict` of the dataclass instance `section` (see the module docstring)."""
  hints = typing.get_type_hints(type(section))
  out = ml_collections.ConfigDict()
  for field in dataclasses.fields(section):
    if field.metadata.get("derived"):
      continue
    value = getattr(section, field.name)
    if _is_section(value):
      value = to_config_dict(value)
    elif value is None:
      value = ml_collections.config_dict.placeholder(_placeholder_type(hints[field.name]))
    setattr(out, field.name, value)
  return out


def _placeholder_type(hint) -> type:
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return args[0] if len(args) == 1 and isinstance(args[0], type) else str


def as_dict(mapping) -> dict:
  if hasattr(mapping, "to_dict"):
    return mapping.to_dict()
  if _is_section(mapping):
    return {f.name: getattr(mapping, f.name) for f in dataclasses.fields(mapping)}
  if not isinstance(mapping, Mapping):
    raise TypeError(f"expected a ConfigDict, dict or dataclass, got {type(mapping).__name__}")
  return dict(mapping)


def check_fields(cls, mapping, *, prefix: str) -> list[str]:
  """Every problem of `mapping` as the fields of `cls` (unknown names, values outside the choices,
  and the same for nested sections), as messages naming `prefix.field`."""
  values = as_dict(mapping)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  problems = []
  for name in sorted(set(values) - set(fields)):
    problems.append(f"{prefix}{name}: unknown field (the fields of '{prefix.rstrip('.') or 'config'}'"
                    f" are {sorted(n for n, f in fields.items() if not f.metadata.get('derived'))})")
  for name, field in fields.items():
    if name not in values:
      continue
    value = values[name]
    if field.metadata.get("derived"):
      problems.append(f"{prefix}{name}: derived from other fields; do not set it")
      continue
    nested = hints.get(name)
    if dataclasses.is_dataclass(nested) and value is not None:
      if not _is_section(value):
        problems += check_fields(nested, value, prefix=f"{prefix}{name}.")
      continue
    allowed = choices(field)
    if allowed is not None and value not in allowed:
      problems.append(f"{prefix}{name}: {value!r} is not one of {tuple(allowed)}")
  return problems


def _converted(cls, values: dict) -> dict:
  """Lists to tuples for tuple fields, nested mappings to their dataclasses."""
  hints = typing.get_type_hints(cls)
  out = {}
  for name, value in values.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint) and value is not None and not _is_section(value):
      value = hint(**_converted(hint, as_dict(value)))
    elif typing.get_origin(hint) is tuple and isinstance(value, list):
      value = tuple(value)
    out[name] = value
  return out


def from_mapping(cls, mapping, *, prefix: str = "", extra: Mapping[str, Any] | None = None):
  """`cls(**mapping)`, checked (module docstring); `extra` adds fields the mapping must not set
  (derived ones). Raises `ConfigError` with every problem."""
  if isinstance(mapping, cls):
    return mapping
  problems = check_fields(cls, mapping, prefix=prefix)
  if problems:
    raise ConfigError(problems)
  values = _converted(cls, as_dict(mapping))
  try:
    return cls(**values, **(extra or {}))
  except (ValueError, TypeError) as e:
    raise ConfigError([f"{prefix.rstrip('.') or 'config'}: {e}"]) from None
