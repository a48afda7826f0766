"""Hugging Face checkpoints (model/hf.py) against `transformers` itself: tiny random OPT
checkpoints of each variant, made with their logits and every layer's ReLU output by
tests/hf/make_oracle.py in the side environment (.venv-hf: torch's CPU build and transformers,
which the main environment goes without). Imported, the model gives transformers' logits, and
its statistics are the ones counted from transformers' own ReLU outputs; bad folders are refused
with one line."""

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.model import layer_stats
from relu_sparsity.model.hf import UnsupportedCheckpoint, load_hf, save_hf
from relu_sparsity.model.transformer import Transformer
from side_env import ROOT

HF_PYTHON = Path(os.environ.get("RELU_SPARSITY_HF_PYTHON", ROOT / ".venv-hf" / "bin" / "python"))
VARIANTS = ("opt_pre_projected", "opt_post_untied", "opt_no_bias", "llama_gqa", "llama_bias_tied")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Path:
    assert HF_PYTHON.exists(), (f"no side environment at {HF_PYTHON}: run `bash scripts/install.sh "
                                "test` (or point RELU_SPARSITY_HF_PYTHON at a Python with torch "
                                "and transformers)")
    out = tmp_path_factory.mktemp("hf")
    subprocess.run([str(HF_PYTHON), str(ROOT / "tests" / "hf" / "make_oracle.py"), str(out)],
                   check=True, capture_output=True, timeout=300)
    return out


def apply(folder: Path, ids: np.ndarray):
    cfg, params = load_hf(folder)
    logits, state = Transformer(cfg).apply({"params": params}, jnp.asarray(ids),
                                           mutable=["intermediates"])
    return np.asarray(logits), layer_stats(state["intermediates"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_opt_gives_transformers_logits(oracle, variant):
    want = np.load(oracle / variant / "oracle.npz")
    logits, _ = apply(oracle / variant, want["ids"])
    np.testing.assert_allclose(logits, want["logits"], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_opt_statistics_count_transformers_relu_outputs(oracle, variant):
    want = np.load(oracle / variant / "oracle.npz")
    ids = want["ids"]
    _, stats = apply(oracle / variant, ids)
    batch, seq_len = ids.shape
    for i, layer in enumerate(stats):
        on = want[f"relu_{i}"] > 0  # [B * T, F], counted here by hand
        assert 0.05 < on.mean() < 0.95  # a layer where counting can go wrong
        np.testing.assert_array_equal(np.asarray(layer.token_count), on.sum(axis=1))
        np.testing.assert_array_equal(np.asarray(layer.seq_count),
                                      on.reshape(batch, seq_len, -1).sum(axis=1))


def copy_of(oracle: Path, variant: str, tmp_path: Path) -> Path:
    folder = tmp_path / variant
    shutil.copytree(oracle / variant, folder)
    return folder


@pytest.mark.parametrize("field, value, said", [
    ("model_type", "gpt2", "model_type='gpt2' is not supported"),
    ("activation_function", "gelu", "activation_function='gelu' is not supported"),
    ("hidden_size", 30, "hidden_size=30 is not divisible by num_attention_heads=4"),
    ("ffn_dim", 0, "ffn_dim=0 must be a positive integer"),
    ("ffn_dim", 81, "has shape (80, 32), config.json gives (81, 32)"),
])
def test_unsupported_opt_configs_are_refused_naming_the_field(oracle, tmp_path, field, value,
                                                             said):
    refused_naming(oracle, tmp_path, "opt_pre_projected", field, value, said)


@pytest.mark.parametrize("field, value, said", [
    ("hidden_act", "silu", "hidden_act='silu' is not supported"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5},
     "rope_type='llama3' is not supported"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling="),
    ("num_key_value_heads", 3, "num_key_value_heads=3 does not divide num_attention_heads=4"),
    ("mlp_bias", True, "mlp_bias=True is not supported"),
    ("head_dim", 16, "head_dim=16 is not supported"),
])
def test_unsupported_llama_configs_are_refused_naming_the_field(oracle, tmp_path, field, value,
                                                               said):
    refused_naming(oracle, tmp_path, "llama_gqa", field, value, said)


def refused_naming(oracle, tmp_path, variant, field, value, said):
    folder = copy_of(oracle, variant, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(UnsupportedCheckpoint) as raised:
        load_hf(folder)
    assert said in str(raised.value) and "\n" not in str(raised.value)


def test_bad_folders_are_refused_in_one_line(oracle, tmp_path):
    folder = copy_of(oracle, "opt_no_bias", tmp_path)
    cases = {tmp_path / "nosuch": "is not a folder", folder / "config.json": "is not a folder"}
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(folder / "config.json", no_weights)
    cases[no_weights] = "holds no *.safetensors file"
    (tmp_path / "no_config").mkdir()
    cases[tmp_path / "no_config"] = "has no config.json"
    for bad, said in cases.items():
        with pytest.raises(UnsupportedCheckpoint) as raised:
            load_hf(bad)
        assert said in str(raised.value) and "\n" not in str(raised.value)


def test_a_missing_tensor_is_named(oracle, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy_of(oracle, "opt_pre_projected", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.decoder.layers.1.fc2.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UnsupportedCheckpoint, match="no tensor model.decoder.layers.1.fc2.weight"):
        load_hf(folder)


def test_the_imported_model_runs_under_jit_in_bfloat16(oracle):
    want = np.load(oracle / "opt_pre_projected" / "oracle.npz")
    cfg, params = load_hf(oracle / "opt_pre_projected", dtype="bfloat16")
    logits = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(
        params, jnp.asarray(want["ids"]))
    assert logits.dtype == jnp.float32
    # bf16 compute: close to the f32 oracle, and the same top token almost everywhere.
    agree = np.mean(np.argmax(logits, -1) == np.argmax(want["logits"], -1))
    assert agree > 0.9, agree


def compacted(cfg, params, seed: int):
    """The model with a random subset of each layer's units, a different width per layer."""
    rng = np.random.default_rng(seed)
    widths = cfg.layer_widths()
    keep = [np.sort(rng.choice(w, w - 7 * (i + 1), replace=False)) for i, w in enumerate(widths)]
    params = jax.tree.map(np.asarray, params)
    unit_axes = {"wi": 1, "bi": 0, "wo": 0, "wg": 1, "wu": 1, "wd": 0}
    for i, k in enumerate(keep):
        mlp = params[f"block_{i}"]["mlp"]
        mlp.update({name: np.take(mlp[name], k, axis=unit_axes[name])
                    for name in mlp if name in unit_axes})
    return dataclasses.replace(cfg, d_ff=tuple(len(k) for k in keep)), params


@pytest.mark.parametrize("variant", ["opt_pre_projected", "opt_post_untied", "llama_gqa",
                                     "llama_bias_tied"])
def test_a_compacted_model_exported_gives_its_logits_in_transformers(oracle, tmp_path, variant):
    ids = np.load(oracle / variant / "oracle.npz")["ids"]
    cfg, params = compacted(*load_hf(oracle / variant), seed=3)
    ours = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(ids)))
    folder = save_hf(cfg, params, tmp_path / "export")
    written = json.loads((folder / "config.json").read_text())
    assert written.get("ffn_dim", written.get("intermediate_size")) == max(cfg.d_ff)
    np.save(folder / "ids.npy", ids)
    subprocess.run([str(HF_PYTHON), str(ROOT / "tests" / "hf" / "make_oracle.py"), "--logits",
                    str(folder)], check=True, capture_output=True, timeout=300)
    np.testing.assert_allclose(np.load(folder / "transformers_logits.npy"), ours,
                               rtol=1e-4, atol=2e-5)
    # and read back here: the padded widths, the same logits
    back_cfg, back = load_hf(folder)
    np.testing.assert_allclose(Transformer(back_cfg).apply({"params": back}, jnp.asarray(ids)),
                               ours, rtol=1e-5, atol=1e-6)


def test_models_outside_opts_and_llamas_layouts_are_refused_before_writing(tmp_path):
    from relu_sparsity.model import TransformerConfig

    small = dict(vocab_size=32, num_layers=1, d_model=16, num_heads=2, d_ff=32)
    cases = {"norm_eps=1e-06, position_offset=0": TransformerConfig(**small),
             "a final norm after post-LN blocks": TransformerConfig(
                 **small, norm_eps=1e-5, position_offset=2, post_norm=True),
             "one fused qkv projection": TransformerConfig(
                 **small, norm="rmsnorm", positions="rope", mlp="gated")}
    for said, cfg in cases.items():
        with pytest.raises(UnsupportedCheckpoint, match=said):
            save_hf(cfg, {}, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_the_readme_example_runs_and_its_export_keeps_the_batch_logits(oracle, tmp_path,
                                                                       monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own model"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n\n")]
    want = np.load(oracle / "opt_pre_projected" / "oracle.npz")
    np.save(tmp_path / "ids.npy", want["ids"])
    shutil.copytree(oracle / "opt_pre_projected", tmp_path / "opt-125m")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 2 and said[0].startswith("layer 0: per token")
    cfg, params = load_hf(tmp_path / "opt-125m-used")
    assert max(cfg.layer_widths()) < 80  # some unit went unused in the batch
    logits = Transformer(cfg).apply({"params": params}, jnp.asarray(want["ids"]))
    np.testing.assert_allclose(logits, want["logits"], rtol=1e-4, atol=2e-5)
