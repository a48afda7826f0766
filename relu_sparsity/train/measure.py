"""The paper's statistics of a fixed model (`relu-sparsity measure`): a run's newest checkpoint,
or an imported run's checkpoint weights before its first step, over batches of a token cache,
with no update. Each batch is logged as a step of a run folder of its own, so that `report`
writes Tables 1-3 and the figures from it as from training (unit states then compare each batch
with the first)."""

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from relu_sparsity.data import TokenCache
from relu_sparsity.kernels.backends import resolve_backend
from relu_sparsity.model import Transformer, layer_stats
from relu_sparsity.model.hf import load_hf
from relu_sparsity.runs.folder import RunFolder
from relu_sparsity.train.config import Config, from_file, to_dict
from relu_sparsity.train.imported import trained_model
from relu_sparsity.train.metrics import UnitStates, layer_records
from relu_sparsity.train.steps import compute_dtype, model_config

log = logging.getLogger(__name__)


def fixed_model(run_dir: Path, config: Config, vocab_size: int):
    """(model config, params): the newest checkpoint's, or the imported weights of a run that
    has not trained yet."""
    if RunFolder(run_dir).checkpoint_steps():
        _, cfg, params, step = trained_model(run_dir)
        log.info("measuring step %d of %s", step, run_dir)
        return cfg, params
    if not config.model.init_from:
        raise ValueError(f"{run_dir} has no checkpoint and no imported weights to measure")
    log.info("measuring the weights of %s", config.model.init_from)
    _, params = load_hf(config.model.init_from)
    return model_config(config, vocab_size), params


def measure(run_dir: str | Path, cache_dir: str | Path, out_dir: str | Path, batches: int, *,
            instrument: str | None = None, batch_size: int | None = None,
            progress: bool = True) -> Path:
    """Writes `out_dir` (config.json, metrics.jsonl: one record per batch of the cache's eval
    split, with the loss and the per-layer metrics) and returns it. `instrument` (xla or
    fused): by default the fused kernel where one runs, else the reference."""
    if batches < 1:
        raise ValueError(f"--batches must be >= 1, got {batches}")
    run_dir = Path(run_dir)
    config = from_file(str(RunFolder(run_dir).config_file))
    config = dataclasses.replace(config, instrument=instrument or default_instrument(config))
    cache = TokenCache(cache_dir)
    cfg, params = fixed_model(run_dir, config, cache.vocab_size)
    if cache.vocab_size != cfg.vocab_size:
        raise ValueError(f"token cache {cache_dir} has a vocabulary of {cache.vocab_size}, the "
                         f"model's is {cfg.vocab_size}")
    cfg = dataclasses.replace(cfg, instrument=config.instrument, backend=config.kernel,
                              dtype=compute_dtype(config))
    out = RunFolder(out_dir)
    out.create()
    # The widths measured: a pruned run's kept units.
    widths = list(cfg.layer_widths())
    values = to_dict(config)
    values["model"]["d_ff"] = widths[0] if len(set(widths)) == 1 else widths
    out.write_config({**values, "measured": str(run_dir.absolute())})
    forward = jax.jit(lambda p, tokens: forward_stats(Transformer(cfg), p, tokens))
    units = [UnitStates(w) for w in cfg.layer_widths()]
    rows = batch_size or config.train.batch_size
    windows = cache.eval_batches(batches, rows, config.model.seq_len)
    for step, tokens in enumerate(tqdm(windows, total=batches, disable=not progress,
                                       unit="batch")):
        loss, stats = forward(params, jnp.asarray(tokens))
        records, _ = layer_records(jax.device_get(stats), units, None)
        out.append_metrics({"step": step, "eval_loss": float(loss), "layers": records})
    return out.path


def default_instrument(config: Config) -> str:
    """The fused kernel where one runs here (the run's kernel choice), else the reference
    statistics, said in the log."""
    name = resolve_backend(config.kernel)
    if name == "reference":
        log.info("no fused kernel runs on %s: the reference statistics (instrument xla)",
                 jax.devices()[0].device_kind)
        return "xla"
    log.info("statistics from the fused kernel %s", name)
    return "fused"


def forward_stats(model: Transformer, params, tokens):
    """(mean next-token loss, per-layer SparsityStats) of one window batch [B, L + 1]."""
    logits, state = model.apply({"params": params}, tokens[:, :-1], mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss, layer_stats(state["intermediates"])
