"""The transformers oracle, run in the side environment (scripts/install.sh test makes .venv-hf:
Python 3.11, torch's CPU build, transformers): tiny random checkpoints of the variants of OPT and
of ReLU-gated Llama-architecture models, each
saved as a Hugging Face folder (config.json, model.safetensors) with oracle.npz beside it: input
ids, transformers' logits for them, and every layer's ReLU output.

    python tests/hf/make_oracle.py OUT_DIR            every variant under OUT_DIR/<variant>
    python tests/hf/make_oracle.py --logits HF_DIR    transformers' logits and ReLU outputs of
                                                      HF_DIR for HF_DIR/ids.npy
"""

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig,
                          OPTForCausalLM)

TINY_OPT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=80,
                num_attention_heads=4, max_position_embeddings=40, activation_function="relu",
                dropout=0.0, attention_dropout=0.0, pad_token_id=1)
TINY_LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=40, hidden_act="relu",
                  rms_norm_eps=1e-5, attention_dropout=0.0)
VARIANTS = {
    # pre-LN, tied, with project_in / project_out (word_embed_proj_dim differs from hidden_size)
    "opt_pre_projected": OPTConfig(**TINY_OPT, word_embed_proj_dim=24),
    # post-LN (OPT-350m's layout: no final LayerNorm), untied
    "opt_post_untied": OPTConfig(**TINY_OPT, do_layer_norm_before=False,
                                 tie_word_embeddings=False),
    # no biases, LayerNorms without parameters
    "opt_no_bias": OPTConfig(**TINY_OPT, enable_bias=False,
                             layer_norm_elementwise_affine=False),
    # grouped-query attention (4 query heads, 2 key/value heads), untied
    "llama_gqa": LlamaConfig(**TINY_LLAMA, num_key_value_heads=2),
    # every head its own keys and values, attention biases, tied embeddings, another RoPE base
    "llama_bias_tied": LlamaConfig(**TINY_LLAMA, num_key_value_heads=4, attention_bias=True,
                                   tie_word_embeddings=True, rope_theta=500.0),
}
CLASSES = {"opt": OPTForCausalLM, "llama": LlamaForCausalLM}


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (biases and LayerNorms included, so that a weight
    mapped to the wrong place shows), at scales that keep the activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if p.ndim == 1 else p.shape[-1] ** -0.5
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def relu_outputs(model) -> list:
    """Hooks that collect each decoder layer's ReLU output [B * T, F] (a gated MLP's gate)."""
    outputs = []
    hook = lambda module, args, out: outputs.append(out.reshape(-1, out.shape[-1]).numpy())
    if isinstance(model, OPTForCausalLM):
        for layer in model.model.decoder.layers:
            layer.activation_fn.register_forward_hook(hook)
    else:
        for layer in model.model.layers:
            layer.mlp.act_fn.register_forward_hook(hook)
    return outputs


def make(out: Path) -> None:
    for seed, (name, config) in enumerate(VARIANTS.items()):
        torch.manual_seed(seed)
        model = randomized(CLASSES[config.model_type](config), seed)
        folder = out / name
        model.save_pretrained(folder, safe_serialization=True)
        ids = np.random.default_rng(seed).integers(2, config.vocab_size, (3, 17))
        hidden = relu_outputs(model)
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)).logits.numpy()
        np.savez(folder / "oracle.npz", ids=ids, logits=logits,
                 **{f"relu_{i}": h for i, h in enumerate(hidden)})


def logits_of(folder: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = np.load(folder / "ids.npy")
    hidden = relu_outputs(model)
    with torch.no_grad():
        np.save(folder / "transformers_logits.npy", model(torch.from_numpy(ids)).logits.numpy())
    np.savez(folder / "transformers_relu.npz", *hidden)


if __name__ == "__main__":
    if sys.argv[1] == "--logits":
        logits_of(Path(sys.argv[2]))
    else:
        make(Path(sys.argv[1]))
