"""What scripts/train.py applies before JAX starts: the config's XLA flags and the persistent
compilation cache (the script calls these two functions of retinanet_jax/runtime/xla_flags.py with the config's
fields; the script itself is not imported here, since its absl flags would clash with other scripts')."""

import os

from configs import r50_fpn, synthetic
from retinanet_jax.runtime import xla_flags


def test_config_cpu_flags_are_added_next_to_other_xla_flags():
  for config in (r50_fpn.get_config(), synthetic.get_config()):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    value = xla_flags.apply_xla_flags(config.runtime.xla_flags_cpu, environ=environ)
    assert environ["XLA_FLAGS"] == value
    assert value.split() == ["--xla_force_host_platform_device_count=4", *xla_flags.CPU_FLAGS]


def test_a_flag_the_user_set_wins_over_the_config():
  user = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
  environ = {"XLA_FLAGS": user}
  assert xla_flags.apply_xla_flags(r50_fpn.get_config().runtime.xla_flags_cpu, environ=environ) == user
  assert xla_flags.apply_xla_flags("", environ={}) == ""


def test_compilation_cache_lives_in_the_workdir_unless_turned_off_or_set_by_the_environment(tmp_path):
  template = r50_fpn.get_config().runtime.compilation_cache_dir
  workdir = os.path.relpath(tmp_path / "run")
  assert (xla_flags.compilation_cache_dir(template, workdir=workdir, environ={})
          == os.path.join(str(tmp_path), "run", "compilation_cache"))
  assert xla_flags.compilation_cache_dir(
      template, workdir=workdir, environ={"JAX_COMPILATION_CACHE_DIR": "/elsewhere"}) is None
  assert xla_flags.compilation_cache_dir("", workdir=workdir, environ={}) is None
  assert xla_flags.compilation_cache_dir("/cache/{workdir}", workdir="/runs/a",
                                         environ={}) == "/cache//runs/a"
