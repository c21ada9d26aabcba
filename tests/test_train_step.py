"""The train step: its global loss normalizer (positives summed over devices, or their EMA), one step
on 4 devices equal to one on 1 device, and state donation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import synthetic
from retinanet_jax import anchors as anchor_lib
from retinanet_jax import config as config_lib
from retinanet_jax import labeling, losses
from retinanet_jax.runtime import mesh as mesh_lib
from retinanet_jax.training import train_state, train_step
from tests.test_losses import make_problem

SIZE = 64


def tiny(config):
  """A network small enough for a test: ResNet-18, 32 channels, one head convolution."""
  config.model.backbone = "resnet18"
  config.model.fpn_channels = 32
  config.model.head_num_convs = 1
  config.train.log_every = 1
  config.eval.num_images_png = 0
  return config


def random_batch(rng, batch, size, slots=5, num_classes=6):
  xy = rng.uniform(0, size * 0.6, (batch, slots, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(8, size * 0.4, (batch, slots, 2))], -1)
  mask = rng.uniform(size=(batch, slots)) < 0.7
  return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          "image_hw": np.full((batch, 2), size, np.int32),
          "boxes": boxes.astype(np.float32),
          "labels": rng.integers(0, num_classes, (batch, slots)).astype(np.int32),
          "box_mask": mask, "is_crowd": np.zeros((batch, slots), bool)}


def test_normalizer_batch_and_ema_golden():
  norm, positives = train_step.loss_normalizer(jnp.float32(7), mode="batch", axis_name=None)
  assert (float(norm), float(positives)) == (7.0, 7.0)
  norm, _ = train_step.loss_normalizer(jnp.float32(0), mode="batch", axis_name=None)
  assert float(norm) == 1.0  # max(1, 0): an image without objects
  norm, _ = jax.jit(functools.partial(train_step.loss_normalizer, mode="ema", momentum=0.9,
                                      axis_name=None))(jnp.float32(20), ema_state=jnp.float32(100))
  np.testing.assert_allclose(norm, 0.9 * 100 + 0.1 * 20, rtol=1e-6)
  with pytest.raises(ValueError, match="loss.normalizer must be one of"):
    train_step.loss_normalizer(jnp.float32(1), mode="EMA", axis_name=None)


def test_global_normalization_across_devices():
  """Per-device sums over the global normalizer, averaged over 2 devices, equal the whole
  batch's loss on one device."""
  devices = jax.devices()[:2]
  assert len(devices) == 2, "tests/conftest.py asks XLA for 4 host devices"
  mesh = jax.make_mesh((2,), ("data",), devices=devices)
  anchors, logits, deltas, gt, labels, mask = make_problem(8, batch=4)
  mask[2, :3] = True
  mask[3, :1] = True

  def per_device(x, d, g, l, m):
    targets = labeling.label_anchors(anchors, g, l, m)
    sums = losses.retinanet_losses(x, d, targets, anchors=anchors)
    normalizer, positives = train_step.loss_normalizer(targets.num_positives, mode="batch",
                                                       axis_name="data")
    out = losses.normalize(sums, normalizer / jax.lax.psum(1.0, "data"))
    return jax.lax.pmean(out.loss, "data"), positives

  spec = P("data")
  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec,) * 5, out_specs=(P(), P())))
  args = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (logits, deltas, gt, labels, mask)]
  loss, num_pos = fn(*args)
  whole = losses.retinanet_loss(logits, deltas, labeling.label_anchors(anchors, gt, labels, mask),
                                anchors=anchors)
  np.testing.assert_allclose(loss, whole.loss, rtol=1e-5)
  assert float(num_pos) == float(whole.num_positives)


def _setup(config, devices):
  config = config_lib.Config.from_config_dict(config)
  mesh = mesh_lib.make_mesh(devices)
  setup = train_state.create_train_state(config, mesh)
  anchors = anchor_lib.generate_anchors((SIZE, SIZE), config=config.anchors).boxes
  return config, mesh, setup, train_step.compile_train_step(setup, config, mesh, anchors)


def test_step_on_four_devices_equals_one_device():
  # sync_bn: batch statistics must be global across devices too. SGD, the paper's optimizer (Adam's
  # per-coordinate normalization turns reduction-order noise in near-zero gradients into full steps).
  config = tiny(synthetic.get_config())
  config.model.norm = "sync_bn"
  config.train.optimizer = "sgd"
  config.train.base_lr = 0.02
  config.train.warmup_steps = 0
  rng = np.random.default_rng(0)
  batches = [random_batch(rng, 8, SIZE) for _ in range(2)]
  results = []
  for devices, reduction in ((jax.devices()[:1], "psum"), (jax.devices()[:4], "psum"),
                             (jax.devices()[:4], "ordered")):
    config.runtime.grad_reduction = reduction
    _, mesh, setup, step = _setup(config, devices)
    state = setup.state
    step_losses = []
    for b in batches:
      state, metrics = step(state, jax.device_put(b, NamedSharding(mesh, P("data"))))
      step_losses.append(float(metrics["loss"]))
    results.append((step_losses, jax.device_get(state.params), jax.device_get(state.rest)))
  (l1, p1, r1) = results[0]
  for l4, p4, r4 in results[1:]:
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p4) + jax.tree.leaves(r4),
                    jax.tree.leaves(p1) + jax.tree.leaves(r1)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, donated", [("auto", False), ("always", True), ("never", False)])
def test_donate_state(mode, donated):
  """'auto' does not donate on the CPU (train_step.donates_state); only 'always' consumes the input
  state, and every mode takes a real step."""
  config = tiny(synthetic.get_config())
  config.runtime.donate_state = mode
  config.train.warmup_steps = 0
  typed, mesh, setup, step = _setup(config, jax.devices()[:1])
  state = setup.state
  # Host copies (jax.device_get can share the CPU buffer, and a shared buffer cannot be donated).
  expected = jax.tree.map(lambda x: np.array(x, copy=True), state.params)
  assert train_step.donates_state(typed, mesh) == donated
  batch = jax.device_put(random_batch(np.random.default_rng(0), 2, SIZE),
                         NamedSharding(mesh, P("data")))
  new_state, _ = step(state, batch)
  leaves = jax.tree.leaves(state.params)
  assert all(x.is_deleted() for x in leaves) == donated
  if not donated:  # the input state is intact
    for a, b in zip(leaves, jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)
  assert int(new_state.step) == 1
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.params),
                                                        jax.tree.leaves(expected))]
  assert sum(changed) > len(changed) // 2


# ----------------------------------------------------------------------------------------------
# The divergence guard


def _guard_steps(losses, *, window, factor, patience):
  """Runs `train_step.divergence_update` under jit over `losses` (steps 1, 2, ...); returns the
  `above` flags and the final guard state as NumPy."""
  update = jax.jit(functools.partial(train_step.divergence_update, factor=factor,
                                     patience=patience))
  guard = train_state.initial_divergence_state(window)
  flags = []
  for step, loss in enumerate(losses, 1):
    guard, above = update(guard, jnp.float32(loss), jnp.int32(step))
    flags.append(bool(above))
  return flags, jax.tree.map(np.asarray, guard)


def _reference_guard(losses, *, window, factor, patience):
  """The guard's definition in NumPy float64: above = loss > factor * median of the previous
  `window` finite losses; a divergence = `patience` steps above in a row."""
  recent, flags, streak, start, episodes, diverged_at = [], [], 0, -1, 0, -1
  for step, loss in enumerate(losses, 1):
    if not np.isfinite(loss):
      flags.append(False)
      continue
    above = bool(recent) and loss > factor * np.median(np.float64(recent[-window:]))
    if above:
      start = step if streak == 0 else start
      streak += 1
      if streak == patience:
        episodes, diverged_at = episodes + 1, start
    else:
      streak = 0
    flags.append(above)
    recent.append(loss)
  return flags, episodes, diverged_at


def test_divergence_guard_golden():
  # Median of the previous losses: step 4 (30 > 10 x 1.5), step 5 (40 > 10 x 1.75), step 6 (60 >
  # 10 x 2.0): three in a row, a divergence from step 4. Step 7 is NaN (ignored), step 8 is back.
  losses = [2.0, 1.0, 1.5, 30.0, 40.0, 60.0, float("nan"), 1.0]
  flags, guard = _guard_steps(losses, window=8, factor=10.0, patience=3)
  assert flags == [False, False, False, True, True, True, False, False]
  assert int(guard["episodes"]) == 1 and int(guard["diverged_at"]) == 4
  assert float(guard["diverged_loss"]) == 30.0 and float(guard["diverged_median"]) == 1.5
  assert int(guard["steps_above"]) == 3 and int(guard["streak"]) == 0
  assert int(guard["seen"]) == 7  # the NaN never entered the ring
  # Two steps above, then one below, then one above: no divergence with patience 3.
  flags, guard = _guard_steps([1.0, 1.0, 1.0, 50.0, 60.0, 1.0, 70.0], window=8, factor=10.0,
                              patience=3)
  assert flags == [False, False, False, True, True, False, True]
  assert int(guard["episodes"]) == 0 and int(guard["diverged_at"]) == -1
  # The first step has nothing to compare with, however large.
  flags, _ = _guard_steps([1e9, 1.0], window=4, factor=10.0, patience=1)
  assert flags == [False, False]


def test_divergence_guard_matches_its_numpy_definition():
  rng = np.random.default_rng(0)
  losses = np.exp(rng.normal(0.0, 0.3, 120))
  for start in (20, 50, 51, 52, 90, 91, 92, 93, 94):  # isolated spikes and streaks
    losses[start] *= 10.0 ** rng.uniform(1.5, 4)
  losses[30] = np.inf
  for window, factor, patience in ((5, 10.0, 3), (16, 20.0, 2), (50, 10.0, 1)):
    flags, guard = _guard_steps(losses, window=window, factor=factor, patience=patience)
    ref_flags, episodes, diverged_at = _reference_guard(list(losses), window=window,
                                                        factor=factor, patience=patience)
    assert flags == ref_flags
    assert (int(guard["episodes"]), int(guard["diverged_at"])) == (episodes, diverged_at)
    assert int(guard["steps_above"]) == sum(ref_flags) > 0


def test_skip_applies_no_update_above_the_threshold_with_a_donated_state():
  config = tiny(synthetic.get_config())
  config.model.freeze_at, config.model.norm = 5, "group_norm"  # compiles ~3x faster
  config.train.warmup_steps = 0
  config.runtime.donate_state = "always"  # every guard leaf must be its own buffer
  config.train.on_divergence = "skip"
  config.train.divergence_factor = 1.01  # a loss above ~the median of the previous ones is a spike
  _, mesh, setup, step = _setup(config, jax.devices()[:1])
  rng = np.random.default_rng(1)
  state = setup.state
  flags = []
  for _ in range(6):
    previous = jax.tree.map(lambda x: np.array(x, copy=True), state.params)
    batch = jax.device_put(random_batch(rng, 2, SIZE), NamedSharding(mesh, P("data")))
    state, metrics = step(state, batch)
    changed = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                           jax.tree.leaves(previous)))
    flags.append(float(metrics["diverging"]) == 1.0)
    assert changed != flags[-1]  # skipped exactly when above the threshold
  assert not flags[0] and any(flags) and not all(flags)  # random batches: some losses are higher
  assert int(state.step) == 6 and int(state.divergence["steps_above"]) == sum(flags)
