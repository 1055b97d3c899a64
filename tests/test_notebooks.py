"""Every notebook in notebooks/ runs top to bottom at its CI size.

Each notebook reads `PROMETAR_NOTEBOOK_SIZE` in its first cell; here it is
"ci" (tiny models, a few steps). The notebook runs in a fresh kernel of this
interpreter (nbclient) with the notebooks folder as working directory, a
per-cell timeout, and writes its outputs under a temporary folder
(`PROMETAR_NOTEBOOK_OUT`); the committed file and its outputs are left
untouched. Any cell error fails the test with the cell's traceback.
"""

import os
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_notebooks_are_found_and_kernel_is_this_python():
  names = {p.name for p in NOTEBOOKS}
  assert "quickstart.ipynb" in names, names
  # ipykernel's "python3" spec says "python", which jupyter_client runs as
  # this interpreter; a python3 kernelspec pointing elsewhere would not.
  cmd = KernelSpecManager().get_kernel_spec("python3").argv[0]
  assert cmd in ("python", "python3") or os.path.samefile(cmd, sys.executable)


def _kernel_env(out_dir: pathlib.Path) -> dict:
  env = dict(os.environ)
  env.update(
    PROMETAR_NOTEBOOK_SIZE="ci",
    PROMETAR_NOTEBOOK_OUT=str(out_dir),
    # Tiny programs: compile time is what costs (see tests/train_testlib).
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    TF_CPP_MIN_LOG_LEVEL="2",
    MPLBACKEND="Agg",
    PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
  )
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_ci_size(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(path.parent)}},
  )
  try:
    client.execute(env=_kernel_env(tmp_path / "out"))
  except CellExecutionError as e:
    pytest.fail(f"{path.name} failed at CI size:\n{e}", pytrace=False)
  errors = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if o.get("output_type") == "error"
  ]
  assert not errors, errors
