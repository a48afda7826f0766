"""Checks a run passes before any work (initialization, compilation, a run folder): its sequence
length against each split of the token cache, and a lower bound of its memory against the
device's. Each refusal is one ValueError naming the field, the value and what would fit."""

import os

import jax

from relu_sparsity.data import TokenCache
from relu_sparsity.train.config import Config

GIB = 2 ** 30


def check_splits(config: Config, cache: TokenCache) -> None:
    """Every split holds at least one window of seq_len + 1 tokens (and one token to spare)."""
    seq_len = config.model.seq_len
    for split in ("train", "eval"):
        tokens = cache.num_tokens(split)
        if tokens < seq_len + 2:
            raise ValueError(
                f"model.seq_len={seq_len} is too long for the {split} split of {cache.path} "
                f"({tokens} tokens): at most {max(tokens - 2, 0)}; use a shorter model.seq_len "
                "or a bigger corpus")


def parameter_count(config: Config, vocab_size: int) -> int:
    """The Transformer's parameters (model/transformer.py): embeddings (and their projections),
    a learned position table, per layer attention (q, k, v and output, with biases where it
    has them), two norms and the MLP (two matrices with biases, or a gated MLP's three), the
    final norm, and an untied output layer where there is one."""
    m = config.model
    d, e = m.d_model, m.embed_dim or m.d_model
    kv = (m.num_kv_heads or m.num_heads) * (d // m.num_heads)  # width of the k and v heads
    widths = [m.d_ff] * m.num_layers if isinstance(m.d_ff, int) else list(m.d_ff)
    attention = 2 * d * d + 2 * d * kv + (2 * d + 2 * kv if m.attention_bias else 0)
    norm = 2 * d if m.norm == "layernorm" else d
    mlp = [3 * d * f if m.mlp == "gated" else 2 * d * f + f + d for f in widths]
    positions = (m.position_offset + (m.max_len or m.seq_len)) * d \
        if m.positions == "learned" else 0
    projections = 2 * e * d if e != d else 0
    unembed = 0 if m.tie_embeddings else vocab_size * e + (vocab_size if m.output_bias else 0)
    return (vocab_size * e + projections + positions + sum(attention + 2 * norm + f for f in mlp)
            + (norm if m.final_norm else 0) + unembed)


def memory_lower_bound(config: Config, vocab_size: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes one device needs at least, by term: the f32 parameters, their gradients and Adam's
    first and second moments (4 bytes a parameter each), and the largest activations the
    backward pass keeps (every MLP's hidden layer, every layer's attention scores, the logits
    and their gradient)."""
    m, t = config.model, config.train
    widths = [m.d_ff] * m.num_layers if isinstance(m.d_ff, int) else list(m.d_ff)
    tokens = t.batch_size * m.seq_len
    f32 = 4 * parameter_count(config, vocab_size)
    hidden = sum(tokens * f * dtype_bytes for f in widths)
    scores = m.num_layers * t.batch_size * m.num_heads * m.seq_len * m.seq_len * 4
    logits = 2 * tokens * vocab_size * 4
    return {"parameters": f32, "gradients": f32, "first moment": f32, "second moment": f32,
            "activations": hidden + scores + logits}


def device_memory() -> tuple[str, int | None]:
    """(device description, bytes it can hold): an accelerator's memory limit, or the host's
    physical memory for the CPU; None where neither can be read."""
    device = jax.devices()[0]
    stats = (device.memory_stats() or {}) if device.platform != "cpu" else {}
    if stats.get("bytes_limit"):
        return device.device_kind, int(stats["bytes_limit"])
    try:
        return "host", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return "host", None


def size_text(num_bytes: int) -> str:
    """'3.2 GiB', '12.0 MiB' or '512 bytes'."""
    if num_bytes >= GIB // 10:
        return f"{num_bytes / GIB:.1f} GiB"
    if num_bytes >= 2 ** 20 // 10:
        return f"{num_bytes / 2 ** 20:.1f} MiB"
    return f"{num_bytes} bytes"


def check_memory(config: Config, vocab_size: int, dtype: str) -> None:
    """A run whose memory lower bound exceeds the device's is refused, with the bound's terms."""
    need = memory_lower_bound(config, vocab_size, 2 if dtype == "bfloat16" else 4)
    where, capacity = device_memory()
    total = sum(need.values())
    if capacity is not None and total > capacity:
        terms = ", ".join(f"{name} {size_text(size)}" for name, size in need.items())
        raise ValueError(
            f"the model does not fit: it needs at least {size_text(total)} ({total} bytes) per "
            f"device ({terms}) and the {where} memory is {size_text(capacity)} ({capacity} "
            "bytes); reduce model.d_ff, model.d_model, model.num_layers, model.seq_len or "
            "train.batch_size")
