"""An imported Hugging Face model through the command line: `prepare --hf-tokenizer`, `import`,
`train` with statistics and pruning, `measure`, `export`, and transformers loading the export
(the side environment of tests/test_hf_import.py). The checkpoints are tiny models of OPT's
layout and of Llama's (gated MLP, grouped-query attention) with units that never fire (a bias of
-1000, or a zero gate), so that the pruning removes them and the export pads them."""

import json
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from relu_sparsity import cli, data
from relu_sparsity.model import Transformer, TransformerConfig
from relu_sparsity.model.hf import load_hf, save_hf
from side_env import ROOT
from tests.test_data import _write_corpus
from tests.test_hf_import import HF_PYTHON
from tests.test_hf_tokenizer import write_tokenizer

DEAD = (10, 20)  # units of layers 0 and 1 that never fire
TRAIN = ["--config", "tiny", "train.steps=6", "train.log_every=1", "train.eval_every=3",
         "train.eval_batches=1", "train.checkpoint_every=3", "model.seq_len=32",
         "train.batch_size=2", "train.warmup_steps=1", "train.peak_lr=1e-4"]


FAMILIES = {
    "opt": dict(norm_eps=1e-5, position_offset=2),
    "llama": dict(norm="rmsnorm", norm_eps=1e-5, positions="rope", num_kv_heads=2,
                  attention_bias=False, mlp="gated", tie_embeddings=False, output_bias=False),
}


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_corpus")
    corpus = _write_corpus(root / "corpus")
    return corpus, write_tokenizer(corpus, _made(root / "tokenizer"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, corpus_and_tokenizer, tmp_path_factory):
    """(HF folder, token cache) of a tiny model of the family in its own tokenizer's tokens."""
    corpus, tokenizer = corpus_and_tokenizer
    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    vocab = json.loads((tokenizer / "config.json").read_text())["vocab_size"]
    cfg = TransformerConfig(vocab_size=vocab, num_layers=2, d_model=32, num_heads=4, d_ff=64,
                            max_len=48, **FAMILIES[request.param])
    params = jax.tree.map(np.array, Transformer(cfg).init(
        jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    for layer, dead in enumerate(DEAD):
        mlp = params[f"block_{layer}"]["mlp"]
        if "bi" in mlp:
            mlp["bi"][:dead] = -1000.0
        else:
            mlp["wg"][:, :dead] = 0.0
    hf = save_hf(cfg, params, root / "hf", extra={"eos_token_id": 2})
    shutil.copy(tokenizer / "tokenizer.json", hf)
    assert cli.main(["prepare", str(corpus), "--out", str(root / "cache"), "--hf-tokenizer",
                     str(hf), "--no-progress"]) == 0
    return hf, root / "cache"


def _made(folder):
    folder.mkdir()
    return folder


def test_import_train_prune_and_export_for_transformers(checkpoint, tmp_path):
    hf, cache = checkpoint
    # Each family one pruning mode, to keep the suite short; the gated model's statistics from
    # a fused kernel (pallas_tpu, interpreted on a CPU).
    opt = json.loads((hf / "config.json").read_text())["model_type"] == "opt"
    prune, instrument = ("compact", "xla") if opt else ("mask", "fused")
    run, out = tmp_path / "run", tmp_path / "export"
    assert cli.main(["import", str(hf), "--out", str(run), "--cache", str(cache), *TRAIN]) == 0
    assert cli.main(["train", "--config", str(run / "config.json"), "--prune", prune,
                     "--prune-at", "2", "--instrument", instrument, "--kernel", "pallas_tpu"
                     if instrument == "fused" else "auto", "--no-report", "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    # Step 0 trained the imported weights: its loss is theirs on batch 0, computed here.
    cfg, params = load_hf(hf)
    tokens = data.TokenCache(cache).batch("train", 0, 2, 32, seed=0)
    logits = Transformer(cfg).apply({"params": params}, jnp.asarray(tokens[:, :-1]))
    want = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    assert records[0]["step"] == 0
    np.testing.assert_allclose(records[0]["loss"], float(want), rtol=1e-5)
    pruned = next(r["pruned"] for r in records if "pruned" in r)
    kept = pruned["kept"]  # without the dead units, and perhaps a few the batch left unused
    assert pruned["mode"] == prune and all(48 <= k + d <= 64 for k, d in zip(kept, DEAD))

    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    exported = json.loads((out / "config.json").read_text())
    ffn_dim = exported.get("ffn_dim", exported.get("intermediate_size"))
    assert ffn_dim == max(kept) and exported["eos_token_id"] == 2
    assert (out / "tokenizer.json").is_file()
    ids = np.asarray(tokens[:, :-1])
    np.save(out / "ids.npy", ids)
    subprocess.run([str(HF_PYTHON), str(ROOT / "tests" / "hf" / "make_oracle.py"), "--logits",
                    str(out)], check=True, capture_output=True, timeout=300)
    back_cfg, back = load_hf(out)
    ours = Transformer(back_cfg).apply({"params": back}, jnp.asarray(ids))
    np.testing.assert_allclose(np.load(out / "transformers_logits.npy"), ours, rtol=1e-4,
                               atol=2e-5)


def test_a_cache_in_other_tokens_is_refused_and_nothing_is_created(checkpoint, tmp_path,
                                                                   capsys):
    hf, _ = checkpoint
    other = data.prepare(tmp_path / "other", [_write_corpus(tmp_path / "c", 3)],
                         vocab_size=300, progress=False)
    assert cli.main(["import", str(hf), "--out", str(tmp_path / "run"), "--cache",
                     str(other)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("relu-sparsity import: error:") and "--hf-tokenizer" in line
    assert not (tmp_path / "run").exists()


def test_exporting_a_model_outside_opts_layout_is_refused(tmp_path, capsys):
    # The default job's model: LayerNorm epsilon 1e-6 and no position offset.
    run = tmp_path / "run"
    assert cli.main(["train", "--config", "tiny", "--run-dir", str(run), "--no-report",
                     "--no-progress", "train.steps=1", "train.checkpoint_every=1",
                     "model.num_layers=1", "model.seq_len=16", "model.d_ff=32",
                     "train.batch_size=1", "train.eval_every=1", "train.eval_batches=1"]) == 0
    assert cli.main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "only models of OPT's or Llama's layout export" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_measure_counts_what_transformers_relu_outputs_show(checkpoint, tmp_path):
    hf, cache = checkpoint
    run = tmp_path / "run"
    assert cli.main(["import", str(hf), "--out", str(run), "--cache", str(cache), *TRAIN]) == 0
    assert cli.main(["measure", str(run), "--cache", str(cache), "--batches", "2",
                     "--batch-size", "2", "--no-progress"]) == 0
    records = [json.loads(line)
               for line in (run / "measure" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert "measured without training" in (run / "measure" / "tables.md").read_text()
    folder = tmp_path / "oracle"
    shutil.copytree(hf, folder)
    for record, window in zip(records, data.TokenCache(cache).eval_batches(2, 2, 32)):
        np.save(folder / "ids.npy", window[:, :-1])
        subprocess.run([str(HF_PYTHON), str(ROOT / "tests" / "hf" / "make_oracle.py"),
                        "--logits", str(folder)], check=True, capture_output=True, timeout=300)
        relu = np.load(folder / "transformers_relu.npz")
        for i, layer in enumerate(record["layers"]):
            on = relu[f"arr_{i}"].reshape(2, 32, -1) > 0  # [sequence, token, unit]
            width = on.shape[-1]
            assert layer["d_ff"] == width
            np.testing.assert_allclose(layer["token_use"], on.sum(-1).mean() / width)
            np.testing.assert_allclose(layer["seq_use"], on.any(1).mean())
            np.testing.assert_allclose(layer["batch_use"], on.any((0, 1)).mean())


def test_importing_an_unsupported_folder_is_one_line_and_creates_nothing(checkpoint, tmp_path,
                                                                         capsys):
    hf, cache = checkpoint
    bad = tmp_path / "hf"
    shutil.copytree(hf, bad)
    config = json.loads((bad / "config.json").read_text())
    field = "activation_function" if config["model_type"] == "opt" else "hidden_act"
    (bad / "config.json").write_text(json.dumps({**config, field: "gelu"}))
    assert cli.main(["import", str(bad), "--out", str(tmp_path / "run"), "--cache",
                     str(cache)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("relu-sparsity import: error:") and f"{field}='gelu'" in line
    assert not (tmp_path / "run").exists()
