"""Runs notebooks/demo.ipynb headless (nbclient, python3 kernel) at tiny size.

The parameter cell reads `P2SD_*` environment variables, which the kernel
inherits from this process: the tiny synthetic config, 2 training steps, 2
images, a temporary workdir and dataset folder. The executed notebook must
have no error output, must show exactly the overlay PNGs and trajectory GIF
that the predict API wrote (displayed bytes equal the files), and must print
the evaluator's PQ metrics as the numbers saved in `metrics.json`.
"""

import base64
import json
import math
import os
import re

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "demo.ipynb")
NUM_IMAGES = 2
STEPS = 2


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  root = tmp_path_factory.mktemp("notebook")
  workdir = str(root / "work")
  env = {
      "P2SD_CONFIG": "tiny",
      "P2SD_STEPS": str(STEPS),
      "P2SD_WORKDIR": workdir,
      "P2SD_NUM_IMAGES": str(NUM_IMAGES),
      "P2SD_DATA_DIR": str(root / "data"),
      "JAX_PLATFORMS": "cpu",
      # Plumbing is checked, not XLA's output quality: compile faster.
      "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
      "PYTHONPATH": os.pathsep.join(
          p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
  }
  previous = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # The kernel process inherits this environment.
  try:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300,
        resources={"metadata": {"path": str(root)}})
    client.execute()
  finally:
    for k, v in previous.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return dict(nb=nb, workdir=workdir)


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _text(cell):
  return "".join(o.get("text", "") for o in cell.outputs
                 if o.output_type == "stream" and o.name == "stdout")


def _cell_with(nb, snippet):
  (cell,) = [c for c in _code_cells(nb) if snippet in c.source]
  return cell


def test_notebook_file_is_clean():
  # Saved without outputs, parameters first, valid nbformat.
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  cells = _code_cells(nb)
  assert all(not c.outputs and c.execution_count is None for c in cells)
  assert "parameters" in cells[0].metadata.get("tags", [])
  for name in ("CONFIG", "STEPS", "WORKDIR", "NUM_IMAGES", "CHECKPOINT"):
    assert re.search(rf"^{name} = ", cells[0].source, re.M), name


def test_no_placeholder_urls():
  # What ships runs as is: no placeholder owner, no file outside the repo;
  # the one setting Colab needs is empty until the user fills it.
  with open(NOTEBOOK) as f:
    text = f.read()
  assert "OWNER" not in text and "../shared" not in text
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = _code_cells(nb)[0].source
  assert 'REPO_URL = os.environ.get("P2SD_REPO_URL", "")' in params
  install = _cell_with(nb, "find_spec")
  assert "set REPO_URL in the Parameters cell" in install.source


def test_no_error_outputs(executed):
  cells = _code_cells(executed["nb"])
  assert all(c.execution_count is not None for c in cells)
  errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
  assert not errors, errors


def test_parameters_were_applied(executed):
  out = _text(_cell_with(executed["nb"], "train.train_and_evaluate"))
  assert out.startswith(f"tiny config: {STEPS} steps of batch 4,"), out
  steps = os.listdir(os.path.join(executed["workdir"], "checkpoints"))
  assert str(STEPS) in steps


def test_metrics_printed_as_numbers(executed):
  out = _text(_cell_with(executed["nb"], "metrics.json"))
  printed = dict(re.findall(r"^  (\w+) = (\S+)$", out, re.M))
  with open(os.path.join(executed["workdir"], "metrics.json")) as f:
    saved = json.load(f)
  assert out.splitlines()[0] == (
      f"Validation panoptic quality at step {STEPS}:")
  assert saved["step"] == STEPS
  assert set(printed) == set(saved["panoptic"])
  for key in ("pq", "sq", "rq", "pq_things", "pq_stuff"):
    value = float(printed[key])
    assert math.isfinite(value) and 0.0 <= value <= 1.0, (key, value)
  for key, value in printed.items():
    assert float(value) == pytest.approx(saved["panoptic"][key], abs=6e-5)
  assert printed["num_images"] == "4"  # The tiny val split.
  # Logged at the first and the last step (log_training_steps=2).
  loss = r"\d+\.\d{3}"
  assert re.search(
      rf"^Training loss {loss} at step 1 -> {loss} at step {STEPS}$", out,
      re.M), out


def _shown(cell, mime):
  return [base64.b64decode(o.data[mime]) for o in cell.outputs
          if o.output_type == "display_data" and mime in o.data]


def test_overlays_written_and_displayed(executed):
  folder = os.path.join(executed["workdir"], "demo_predictions", "overlays")
  names = sorted(os.listdir(folder))
  assert len(names) == NUM_IMAGES
  files = []
  for name in names:
    with open(os.path.join(folder, name), "rb") as f:
      files.append(f.read())
  assert files[0].startswith(b"\x89PNG")
  shown = _shown(_cell_with(executed["nb"], 'output, "overlays"'), "image/png")
  assert shown == files


def test_trajectory_displayed(executed):
  folder = os.path.join(executed["workdir"], "demo_predictions",
                        "trajectories")
  cell = _cell_with(executed["nb"], "trajectories")
  (strip,) = _shown(cell, "image/png")
  (gif,) = _shown(cell, "image/gif")
  stems = sorted(n[:-4] for n in os.listdir(folder) if n.endswith(".gif"))
  assert len(stems) == NUM_IMAGES
  with open(os.path.join(folder, f"{stems[0]}.png"), "rb") as f:
    assert strip == f.read()
  with open(os.path.join(folder, f"{stems[0]}.gif"), "rb") as f:
    assert gif == f.read()
  assert gif.startswith(b"GIF8")


def test_ground_truth_strips_displayed(executed):
  cell = _cell_with(executed["nb"], "panoptic_step")
  shown = _shown(cell, "image/png")
  # The tiny val split has 4 images; the cell shows NUM_IMAGES of them.
  assert len(shown) == NUM_IMAGES
  assert all(s.startswith(b"\x89PNG") for s in shown)
