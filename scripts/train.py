"""Train and evaluate RetinaNet.

    python scripts/train.py --config=configs/synthetic.py --workdir=runs/synthetic
    python scripts/train.py --config=configs/r50_fpn.py --workdir=runs/r50 --config.train.batch_size=8

Several hosts (or several processes on one machine): every process runs the same command plus
    --coordinator_address=HOST:PORT --num_processes=N --process_id=i
On SLURM (srun) and Open MPI (mpirun) leave those out: `jax.distributed.initialize()` reads the
environment, and is called whenever that environment is detected. On Cloud TPU pod slices add
`--distributed` (the TPU metadata tells JAX the rest). Without an accelerator, processes talk through
gloo CPU collectives. docs/multihost.md has the recipes and explains how resume works.

Killed runs: rerun the same command; it continues from the last complete checkpoint in --workdir
(a damaged one is set aside: `train.on_damaged_checkpoint`).

The console shows this project's lines only; the libraries' log lines go to WORKDIR/log.txt
(`--verbose`: on the console too; retinanet_jax/runtime/console.py). Expected failures end with one paragraph
and an exit code (docs/failures.md, "Exit codes"; retinanet_jax/runtime/errors.py), unexpected ones with a traceback.
"""

import os

from retinanet_jax.runtime import console  # (imports no JAX, no TensorFlow)

console.quiet_native_logs()  # before the config file's imports start TensorFlow

from absl import app, flags, logging  # noqa: E402  pylint: disable=wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=wrong-import-position

from retinanet_jax.runtime import errors, xla_flags  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, logs, metrics and pictures go here.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (TPU pod slices, SLURM, "
                  "Open MPI: it reads the environment). Default: when --coordinator_address is "
                  "given or a SLURM/Open MPI/TPU-pod environment is detected.")
flags.DEFINE_bool("verbose", False, "Show the libraries' log lines (Orbax, TFDS, JAX, TensorFlow) on "
                  "the console too; they always go to WORKDIR/log.txt.")
flags.mark_flags_as_required(["config", "workdir"])


def cluster_environment() -> str | None:
  """The launcher whose environment `jax.distributed.initialize()` reads by itself, if any."""
  env = os.environ
  if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                            "SLURM_LOCALID")):  # inside srun (not just an salloc shell)
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "openmpi"
  if "TPU_WORKER_HOSTNAMES" in env or "MEGASCALE_COORDINATOR_ADDRESS" in env:
    return "tpu"
  return None


def initialize_distributed() -> None:
  import jax  # pylint: disable=import-outside-toplevel

  explicit = FLAGS.coordinator_address is not None
  if explicit and (FLAGS.num_processes is None or FLAGS.process_id is None):
    raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
  wanted = FLAGS.distributed if FLAGS.distributed is not None else (
      explicit or cluster_environment() is not None)
  if not wanted:
    return
  # Cross-process collectives of the CPU backend (no effect on GPU/TPU computations).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                  process_id=FLAGS.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("Process %d of %d, %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(verbose=FLAGS.verbose)
  runtime = FLAGS.config.runtime
  xla_flags.apply_xla_flags(runtime.xla_flags_cpu)  # before JAX starts; a flag in $XLA_FLAGS wins
  from retinanet_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  # Every problem of the config at once, before anything is compiled (a ConfigError: exit code 2).
  config = config_lib.Config.from_config_dict(FLAGS.config)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], "GPU")  # tf.data only: keep TensorFlow off the accelerators
  initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  index = jax.process_index()
  console.setup(verbose=FLAGS.verbose, log_path=os.path.join(
      FLAGS.workdir, "log.txt" if index == 0 else f"log_process_{index}.txt"))
  cache_dir = xla_flags.compilation_cache_dir(config.runtime.compilation_cache_dir,
                                            workdir=FLAGS.workdir)
  if cache_dir:
    xla_flags.enable_compilation_cache(cache_dir)
    logging.info("Persistent compilation cache: %s", cache_dir)
  from retinanet_jax.training import train  # pylint: disable=import-outside-toplevel
  logging.info("Config:\n%s", FLAGS.config)
  summary = train.train_and_evaluate(config, FLAGS.workdir)
  logging.info("Done: %s", summary)


if __name__ == "__main__":
  errors.run(main)
