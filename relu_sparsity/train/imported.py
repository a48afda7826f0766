"""Runs of a model trained elsewhere: a Hugging Face checkpoint folder (model/hf.py) as the
`model` section of a run's config (`relu-sparsity import`), and its weights as the parameters a
fresh run starts from (`model.init_from`)."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from relu_sparsity.data import TokenCache
from relu_sparsity.model.hf import load_hf, read_hf_config
from relu_sparsity.model.transformer import TransformerConfig
from relu_sparsity.runs.checkpoints import read_on_host
from relu_sparsity.runs.folder import RunFolder
from relu_sparsity.train.config import (
    ARCHITECTURE_FIELDS,
    Config,
    from_dict,
    from_file,
    to_dict,
)
from relu_sparsity.train.pruning import Pruning, compact_tree
from relu_sparsity.train.steps import model_config

DEFAULT_SEQ_LEN = 512  # training windows, at most the checkpoint's own position limit


def model_settings(cfg: TransformerConfig, init_from: Path) -> dict:
    """The `model` section of a run of the checkpoint described by `cfg`."""
    widths = cfg.layer_widths()
    return {
        "num_layers": cfg.num_layers, "d_model": cfg.d_model, "num_heads": cfg.num_heads,
        "d_ff": widths[0] if len(set(widths)) == 1 else list(widths),
        "seq_len": min(cfg.max_len, DEFAULT_SEQ_LEN), "max_len": cfg.max_len,
        "tie_embeddings": cfg.tie_embeddings, "init_from": str(init_from.resolve()),
        **{name: getattr(cfg, name) for name in ARCHITECTURE_FIELDS}}


def imported_config(hf_dir: str | Path, cache_dir: str | Path, base: Config) -> Config:
    """`base` (a preset, with the user's overrides) with the model of the checkpoint in hf_dir
    and the token cache at cache_dir, refused when the cache's vocabulary is not the model's.
    Reads the checkpoint's weights once, so that a folder that cannot load is refused here."""
    hf_dir = Path(hf_dir)
    cfg, _ = load_hf(hf_dir)
    cache = TokenCache(cache_dir)
    if cache.vocab_size != cfg.vocab_size:
        raise ValueError(f"token cache {cache_dir} has a vocabulary of {cache.vocab_size}, the "
                         f"model's is {cfg.vocab_size}: prepare the cache with --hf-tokenizer "
                         f"{hf_dir}")
    values = to_dict(base)
    values["model"].update(model_settings(cfg, hf_dir))
    values["data"].update(vocab_size=cfg.vocab_size, cache=str(Path(cache_dir).absolute()))
    values["name"] = read_hf_config(hf_dir).get("_name_or_path") or hf_dir.name
    return from_dict(values)


def with_imported_params(state, optimizer, hf_dir: str):
    """A fresh train state with the checkpoint's weights as its parameters (and the optimizer
    state made for them); a ValueError naming the first parameter whose shape differs."""
    _, params = load_hf(hf_dir)
    wanted = jax.tree_util.tree_flatten_with_path(state.params)[0]
    given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in wanted:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if path not in given:
            raise ValueError(f"{hf_dir} gives no parameter {name}")
        if np.shape(given[path]) != leaf.shape:
            raise ValueError(f"{hf_dir}: parameter {name} has shape {np.shape(given[path])}, "
                             f"the model's is {leaf.shape}")
    params = jax.tree.map(lambda mine, theirs: jnp.asarray(theirs, mine.dtype), state.params,
                          params)
    return dataclasses.replace(state, params=params, opt_state=optimizer.init(params))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def trained_model(run_dir: str | Path) -> tuple[Config, TransformerConfig, dict, int]:
    """(run config, model config, host params, step) of a run's newest checkpoint, at the
    widths of the units it kept: after a compaction, without its zero padding; in mask or random
    mode, cut to the live units."""
    folder = RunFolder(run_dir)
    steps = folder.checkpoint_steps()
    if not folder.config_file.is_file() or not steps:
        raise ValueError(f"{run_dir} holds no trained run (no config.json or no checkpoint)")
    config = from_file(str(folder.config_file))
    state, meta = read_on_host(folder.checkpoints, steps[-1])
    params = state["params"]
    vocab_size = int(np.shape(params["embed"]["embedding"])[0])
    cfg = dataclasses.replace(model_config(config, vocab_size), dtype="float32", live=None)
    if meta.get("pruning"):
        pruning = Pruning.from_state_dict(meta["pruning"])
        kept = tuple(np.arange(len(k)) if pruning.mode == "compact" else np.asarray(k)
                     for k in pruning.keep)
        params = compact_tree(params, kept)
        cfg = dataclasses.replace(cfg, d_ff=tuple(len(k) for k in kept))
    return config, cfg, params, steps[-1]
