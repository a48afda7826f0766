"""Runs tests/seqio (the TFDS source read through seqio, and a token cache from it) in the side
environment that scripts/install.sh makes: Python 3.12 with TensorFlow (CPU), TFDS and seqio,
which the main environment goes without. relu_sparsity.data imports no JAX, so the package
imports there from the repository root."""

import json
import os
from pathlib import Path

import pytest

from relu_sparsity.data.tfds import TfdsSource
from side_env import ROOT, run_side_tests
SIDE_PYTHON = Path(os.environ.get("RELU_SPARSITY_SEQIO_PYTHON",
                                  ROOT / ".venv-seqio" / "bin" / "python"))


def test_tfds_source_through_seqio():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    run_side_tests(SIDE_PYTHON, ROOT / "tests" / "seqio",
                   "run `bash scripts/install.sh test` (or point RELU_SPARSITY_SEQIO_PYTHON at a "
                   "Python with seqio, tensorflow-datasets, numpy, sentencepiece, tqdm, pytest)",
                   env={"PYTHONPATH": path})


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
    with pytest.raises(ImportError) as raised:
        next(source.documents())
    assert "seqio extra" in str(raised.value) and "\n" not in str(raised.value)
