"""Every known error kind ends a script with one paragraph on stderr and its exit code
(retinanet_jax/runtime/errors.py, docs/failures.md, "Exit codes"); an unexpected one keeps its traceback. Runs
`errors.run` in-process with mains that raise what the library raises."""

import subprocess
import sys
import textwrap

import pytest

from retinanet_jax import checkpoints
from retinanet_jax.runtime import errors, typed_config
from retinanet_jax.training import train


@pytest.mark.parametrize("make, code", [
    (lambda: typed_config.ConfigError(["train.base_lr: base_lr must be > 0, got -1"]), 2),
    (lambda: FileNotFoundError("dataset 'coco/2017' not found in data_dir /x"), 3),
    (lambda: AssertionError("Dataset coco: could not find data in /x. Please make sure to call "
                            "dataset_builder.download_and_prepare()"), 3),  # TFDS's words
    (lambda: checkpoints.DamagedCheckpointError("checkpoint step 5 in /w/checkpoints/5 is damaged",
                                                path="/w/checkpoints/5", step=5), 4),
    (lambda: checkpoints.CheckpointError("/w does not exist"), 4),
    (lambda: train.NonFiniteLossError("the loss or its gradient was not finite at step 3"), 5),
    (lambda: train.DivergenceError("the loss diverged at step 2"), 5),
    (lambda: FileExistsError("out/detections.json exists; nothing was written"), 6),
])
def test_known_errors_exit_with_their_code_and_one_paragraph(make, code):
  error = make()
  assert errors.exit_code_of(error) == code
  text = errors.paragraph(error)
  assert text.startswith("error: ") and str(error).splitlines()[0][:40] in text
  assert code in errors.EXIT_CODES
  assert errors.exit_code_of(AssertionError("x == y")) is None  # others stay unexpected


def test_missing_prepared_data_says_how_to_prepare_it():
  text = " ".join(errors.paragraph(AssertionError(
      "Dataset coco: could not find data in /x. Please make sure to call "
      "dataset_builder.download_and_prepare()")).split())
  assert text.startswith("error: Dataset coco: could not find data in /x. Prepare it first")
  assert "--config.data.data_dir" in text and "download_and_prepare" not in text


SCRIPT = textwrap.dedent("""
    import sys
    from retinanet_jax.runtime import errors
    from retinanet_jax.training import train
    def main(argv):
      if argv[1] == "known":
        raise train.NonFiniteLossError("the loss or its gradient was not finite at step 3 (numbered "
                                       "as in the log); " + "every word of it, " * 12 + "end.")
      raise KeyError("a bug")
    errors.run(main)
""")


@pytest.mark.parametrize("kind", ["known", "unexpected", "--no_such_flag"])
def test_a_script_ends_known_errors_without_a_traceback_and_keeps_unexpected_ones(kind, tmp_path):
  path = tmp_path / "script.py"
  path.write_text(SCRIPT)
  done = subprocess.run([sys.executable, str(path), kind], capture_output=True, text=True,
                        timeout=120, check=False)
  if kind == "known":
    assert done.returncode == 5 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: the loss or its gradient was not finite at step 3")
    assert "end." in done.stderr and all(len(l) <= 100 for l in done.stderr.splitlines())
  elif kind == "unexpected":
    assert done.returncode == 1 and "Traceback" in done.stderr and "KeyError: 'a bug'" in done.stderr
  else:
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: Unknown command line flag 'no_such_flag'")
