"""Bad inputs through the real entry points: one `error:` line, exit 2.

Each case runs `python -m pix2seq_d_jax.main` (or `.predict`) in a fresh
process and checks that stderr holds exactly one line starting with
`error:`, that it names the offending flag, file or field, that no
`Traceback` is printed and that the exit status is 2. Most cases fail before
jax is initialised (about a second each); the dataset cases go as far as
building the data source.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _run(args, cwd, module="pix2seq_d_jax.main"):
  proc = subprocess.run(
      [sys.executable, "-m", module, *args], cwd=cwd, env=_ENV,
      capture_output=True, text=True, timeout=300)
  output = proc.stdout + proc.stderr
  assert "Traceback" not in output, output
  errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1, output
  assert proc.returncode == 2, output
  return errors[0]


def _check(line, *fragments):
  for fragment in fragments:
    assert fragment in line, (fragment, line)


@pytest.fixture
def outside(tmp_path):
  """A cwd outside the repository, where `configs/` does not exist."""
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  return cwd


def _readonly_dir(tmp_path):
  if os.geteuid() == 0:
    # root writes through permission bits; sysfs refuses new files to all.
    return "/sys/kernel"
  path = tmp_path / "readonly"
  path.mkdir()
  path.chmod(0o555)
  return str(path)


@pytest.mark.parametrize("mode", ["train_eval", "eval"])
def test_workdir_errors(tmp_path, outside, mode):
  # Also run from outside the checkout with the default (relative) config.
  cfg = f"--mode={mode}"
  line = _run(["--workdir=", cfg], outside)
  _check(line, "--workdir is empty", "unset shell variable")
  assert os.listdir(outside) == []  # Nothing written into the cwd.

  afile = tmp_path / "afile"
  afile.write_text("x")
  line = _run([f"--workdir={afile}", cfg], outside)
  _check(line, f"--workdir={afile}", "is not a directory")

  readonly = _readonly_dir(tmp_path)
  line = _run([f"--workdir={readonly}/run", cfg], outside)
  _check(line, f"--workdir={readonly}/run", "not a writable directory")
  if os.geteuid() != 0:
    line = _run([f"--workdir={readonly}", cfg], outside)
    _check(line, f"--workdir={readonly}", "not a writable directory")


def test_config_errors(tmp_path, outside):
  workdir = f"--workdir={tmp_path / 'w'}"
  line = _run([workdir, "--config=configs/nope.py"], REPO)
  _check(line, "--config=configs/nope.py", "config file not found",
         os.path.join(REPO, "configs", "nope.py"))
  line = _run([workdir, "--config=configs/nope.py"], outside)
  _check(line, "config file not found", str(outside / "configs" / "nope.py"),
         os.path.join(REPO, "configs", "nope.py"))
  # configs/... resolves against the checkout from elsewhere: the error is
  # the variant's, not a missing file.
  line = _run([workdir, "--config=configs/synthetic.py:bogus"], outside)
  _check(line, "configs/synthetic.py:bogus", "config argument 'bogus' is "
         "unknown", "['long', 'steps', 'tiny', 'video']")
  line = _run([workdir, "--config=configs/synthetic.py:steps=abc"], REPO)
  _check(line, "steps='abc'", "expected a value of type int")
  # The default config loads from elsewhere (the override is checked
  # against it).
  line = _run([workdir, "--config.input.nope=1"], outside)
  _check(line, "--config.input.nope=1", "nope")
  assert not (tmp_path / "w").exists()
  # A (height, width) override is parsed as a pair and checked per axis.
  line = _run([workdir, "--config.input.image_size=(32,72)",
               "--config.input.mask_size=16,36"], REPO)
  _check(line, "config.input.image_size=(32, 72)", "a width that is a "
         "multiple of 16", "got 72")


def test_predict_config_errors(tmp_path, outside):
  common = [f"--checkpoint={tmp_path}", f"--input={tmp_path}",
            f"--output={tmp_path / 'out'}"]
  line = _run(["--config=configs/nope.py", *common], outside,
              module="pix2seq_d_jax.predict")
  _check(line, "--config=configs/nope.py", "config file not found")
  line = _run(["--config=configs/synthetic.py:bogus", *common], outside,
              module="pix2seq_d_jax.predict")
  _check(line, "config argument 'bogus' is unknown")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train_eval", "eval"])
def test_missing_dataset_hints_data_dir(tmp_path, outside, mode):
  # configs/coco.py leaves data_dir empty: the user must set it.
  line = _run([f"--workdir={tmp_path / 'w'}", "--config=configs/coco.py",
               f"--mode={mode}"], outside)
  _check(line, "Panoptic dataset root not found: an empty path",
         "--config.input.data_dir=DIR")
  missing = tmp_path / "no_coco"
  line = _run([f"--workdir={tmp_path / 'w'}", "--config=configs/coco.py",
               f"--config.input.data_dir={missing}", f"--mode={mode}"],
              outside)
  _check(line, f"Panoptic dataset root not found: '{missing}'",
         "--config.input.data_dir=DIR")
