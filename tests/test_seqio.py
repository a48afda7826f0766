"""Runs tests/seqio (the TFDS source read through seqio, and a token cache from it) in the side
environment that scripts/install.sh makes: Python 3.12 with TensorFlow (CPU), TFDS and seqio,
which the main environment goes without. relu_sparsity.data imports no JAX, so the package
imports there from the repository root."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relu_sparsity.data.tfds import TfdsSource

ROOT = Path(__file__).resolve().parents[1]
SIDE_PYTHON = Path(os.environ.get("RELU_SPARSITY_SEQIO_PYTHON",
                                  ROOT / ".venv-seqio" / "bin" / "python"))


def test_tfds_source_through_seqio():
    assert SIDE_PYTHON.exists(), (
        f"no seqio side environment at {SIDE_PYTHON}: run `bash scripts/install.sh test` (or "
        "point RELU_SPARSITY_SEQIO_PYTHON at a Python with seqio, tensorflow-datasets, numpy, "
        "sentencepiece, tqdm, pytest)")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    # --confcutdir: tests/conftest.py belongs to the JAX suite, not to the side environment.
    folder = ROOT / "tests" / "seqio"
    done = subprocess.run([str(SIDE_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--confcutdir", str(folder), str(folder)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary


def test_tfds_source_checks_without_tensorflow(tmp_path):
    """Here, without TensorFlow: a source is checked and described from TFDS's JSON files alone,
    and reading it says in one line what to install."""
    folder = tmp_path / "tiny_text" / "1.0.0"
    folder.mkdir(parents=True)
    splits = [{"name": name, "numBytes": "100", "shardLengths": [count]}
              for name, count in (("train", "3"), ("validation", "2"))]
    (folder / "dataset_info.json").write_text(json.dumps(
        {"name": "tiny_text", "version": "1.0.0", "splits": splits}))
    (folder / "features.json").write_text(json.dumps(
        {"featuresDict": {"features": {"text": {"text": {}}}}}))
    source = TfdsSource("tiny_text", tmp_path)
    assert source.describe()["examples"] == {"train": 3, "eval": 2}
    assert len(source.fingerprint()) == 64
    assert "tensorflow" not in sys.modules and "seqio" not in sys.modules
    with pytest.raises(ImportError) as raised:
        next(source.documents())
    assert "seqio extra" in str(raised.value) and "\n" not in str(raised.value)
