"""Fixtures of the model tests (helpers in torchvision_reference.py)."""

import jax
import pytest
from torchvision_reference import TORCHVISION_BUILDERS, torchvision_pair_for


@pytest.fixture(scope="session", params=sorted(TORCHVISION_BUILDERS))
def torchvision_pair(request):
  """(source, torchvision model in eval mode, our converted model) for v1 and v2."""
  return torchvision_pair_for(request.param)


@pytest.fixture(scope="session")
def torchvision_v2_pair():
  return torchvision_pair_for("torchvision_v2")


@pytest.fixture(autouse=True)
def float32_convolutions():
  """Full float32 convolutions on every backend (GPUs would otherwise use TF32 for float32 inputs,
  which is not what the 1e-4 parity tolerances are about); a no-op on CPU."""
  with jax.default_matmul_precision("highest"):
    yield
