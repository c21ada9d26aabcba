"""The notebooks of notebooks/: each one runs to the end in its tiny mode (its own `assert`s check the
paper's facts: Figure 1 equals the closed form, jax.grad the analytic derivative, ...), and every
committed notebook is stored without outputs.

The kernel is this interpreter (`sys.executable`, through a kernel spec written for the test), so a
fresh clone's `.venv` runs them; the repository is first on its `PYTHONPATH`. `RETINANET_NOTEBOOK_MODE=tiny`
makes each notebook small and sends its pictures to a temporary folder (docs/images/ is untouched).
"""

import json
import os
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NAMES = ("focal_loss", "loss_distribution", "ablation", "multilabel_focal")
KERNEL = "retinanet_jax_tests"


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
  """A kernel spec that starts `sys.executable -m ipykernel_launcher`."""
  folder = tmp_path_factory.mktemp("kernels")
  (folder / KERNEL).mkdir()
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "retinanet_jax tests", "language": "python"}
  (folder / KERNEL / "kernel.json").write_text(json.dumps(spec))
  return [str(folder)]


def test_every_notebook_is_tested():
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_tiny_mode(name, kernel_dirs, tmp_path, monkeypatch):
  monkeypatch.setenv("RETINANET_NOTEBOOK_MODE", "tiny")
  monkeypatch.setenv("RETINANET_NOTEBOOK_TMP", str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  manager = KernelManager(kernel_name=KERNEL,
                          kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
  client = NotebookClient(notebook, km=manager, timeout=900, startup_timeout=120,
                          resources={"metadata": {"path": str(NOTEBOOKS)}})
  pictures = sorted((p.name, p.stat().st_mtime_ns) for p in (REPO / "docs" / "images").glob("*"))
  try:
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
  finally:  # a client given its manager (km=...) leaves the kernel running
    if manager.has_kernel:
      manager.shutdown_kernel(now=True)
  assert sorted((p.name, p.stat().st_mtime_ns) for p in (REPO / "docs" / "images").glob("*")) == \
      pictures, "tiny mode must leave docs/images alone"
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs), \
      "the notebook drew no figure"


def test_notebooks_are_stored_without_outputs():
  for path in sorted(NOTEBOOKS.glob("*.ipynb")):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for i, cell in enumerate(notebook.cells):
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, \
            f"{path.name} cell {i} has outputs: strip them before committing"
