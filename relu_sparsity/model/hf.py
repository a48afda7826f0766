"""Hugging Face checkpoints from a local folder (`config.json` and safetensors files, no network)
as this package's `Transformer`: OPT, whose MLP is a plain ReLU with biases, and Llama-architecture
models with `hidden_act: relu` (ReluLLaMA, for one), whose MLP is gated: RMSNorm, rotary
positions, grouped-query attention.

`load_hf(folder)` reads the folder's config, refuses anything the model cannot reproduce with one
line naming the config field, and maps the weights onto the parameter tree of `Transformer`
(PyTorch's Linear weights are [out, in]; Flax's kernels [in, out]). The safetensors files are
read by the `safetensors` package (its Flax loader keeps bfloat16)."""

import json
from pathlib import Path

import numpy as np

from relu_sparsity.model.transformer import TransformerConfig

CONFIG_FILE = "config.json"
OPT_POSITION_OFFSET = 2  # OPT's learned position table keeps its first two rows unused
OPT_NORM_EPS = 1e-5  # PyTorch's LayerNorm default, which OPT uses
SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class UnsupportedCheckpoint(ValueError):
    """A folder this package cannot load as the same model."""


def read_hf_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise UnsupportedCheckpoint(f"{folder} is not a folder (expected a Hugging Face "
                                    "checkpoint folder: config.json and *.safetensors)")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise UnsupportedCheckpoint(f"{folder} has no {CONFIG_FILE}") from None
    except ValueError as err:
        raise UnsupportedCheckpoint(f"{folder / CONFIG_FILE} is not JSON: {err}") from None
    if not isinstance(config, dict):
        raise UnsupportedCheckpoint(f"{folder / CONFIG_FILE} does not hold a JSON object")
    return config


def require(config: dict, field: str, allowed, default=None):
    """config[field] (or `default` where absent), refused unless it is among `allowed`."""
    value = config.get(field, default)
    if value not in allowed:
        raise UnsupportedCheckpoint(f"config.json: {field}={value!r} is not supported "
                                    f"(supported: {', '.join(map(repr, allowed))})")
    return value


def positive_int(config: dict, field: str, default=None) -> int:
    value = config.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UnsupportedCheckpoint(f"config.json: {field}={value!r} must be a positive "
                                    "integer")
    return value


def opt_config(config: dict, *, instrument: str = "xla", dtype: str = "float32"
               ) -> TransformerConfig:
    """The `TransformerConfig` of an OPT config.json."""
    require(config, "model_type", ("opt",))
    require(config, "activation_function", ("relu",), "relu")
    d_model = positive_int(config, "hidden_size")
    num_heads = positive_int(config, "num_attention_heads")
    if d_model % num_heads:
        raise UnsupportedCheckpoint(f"config.json: hidden_size={d_model} is not divisible by "
                                    f"num_attention_heads={num_heads}")
    pre_norm = require(config, "do_layer_norm_before", (True, False), True)
    remove_final = require(config, "_remove_final_layer_norm", (True, False), False)
    return TransformerConfig(
        vocab_size=positive_int(config, "vocab_size"),
        num_layers=positive_int(config, "num_hidden_layers"),
        d_model=d_model, num_heads=num_heads, d_ff=positive_int(config, "ffn_dim"),
        max_len=positive_int(config, "max_position_embeddings"),
        tie_embeddings=require(config, "tie_word_embeddings", (True, False), True),
        instrument=instrument, dtype=dtype, norm_eps=OPT_NORM_EPS, post_norm=not pre_norm,
        final_norm=pre_norm and not remove_final, position_offset=OPT_POSITION_OFFSET,
        embed_dim=positive_int(config, "word_embed_proj_dim", d_model), output_bias=False)


def llama_config(config: dict, *, instrument: str = "xla", dtype: str = "float32"
                 ) -> TransformerConfig:
    """The `TransformerConfig` of a Llama-architecture config.json with a ReLU gate."""
    require(config, "model_type", ("llama",))
    require(config, "hidden_act", ("relu",))
    require(config, "mlp_bias", (False,), False)
    d_model = positive_int(config, "hidden_size")
    num_heads = positive_int(config, "num_attention_heads")
    if d_model % num_heads:
        raise UnsupportedCheckpoint(f"config.json: hidden_size={d_model} is not divisible by "
                                    f"num_attention_heads={num_heads}")
    require(config, "head_dim", (None, d_model // num_heads))
    num_kv_heads = positive_int(config, "num_key_value_heads", num_heads)
    if num_heads % num_kv_heads:
        raise UnsupportedCheckpoint(f"config.json: num_key_value_heads={num_kv_heads} does not "
                                    f"divide num_attention_heads={num_heads}")
    return TransformerConfig(
        vocab_size=positive_int(config, "vocab_size"),
        num_layers=positive_int(config, "num_hidden_layers"), d_model=d_model,
        num_heads=num_heads, d_ff=positive_int(config, "intermediate_size"),
        max_len=positive_int(config, "max_position_embeddings"),
        tie_embeddings=require(config, "tie_word_embeddings", (True, False), False),
        instrument=instrument, dtype=dtype, norm="rmsnorm",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), positions="rope",
        rope_theta=rope_theta(config), num_kv_heads=num_kv_heads,
        attention_bias=require(config, "attention_bias", (True, False), False), mlp="gated",
        output_bias=False)


def rope_theta(config: dict) -> float:
    """The RoPE base of plain (unscaled) rotary positions, from `rope_parameters`
    (transformers 5) or `rope_theta` with `rope_scaling` (earlier versions)."""
    parameters = config.get("rope_parameters") or {}
    if not isinstance(parameters, dict):
        raise UnsupportedCheckpoint("config.json: rope_parameters must be an object")
    if parameters:
        require(parameters, "rope_type", ("default",), "default")
    require(config, "rope_scaling", (None,))
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise UnsupportedCheckpoint(f"config.json: rope_theta={theta!r} must be a positive "
                                    "number")
    return float(theta)


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors files (one file, or the shards an index
    names), by name."""
    from safetensors.flax import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedCheckpoint(f"{folder} holds no *.safetensors file (PyTorch .bin "
                                    "checkpoints are not read: save with "
                                    "safe_serialization=True)")
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


class Weights:
    """A checkpoint's tensors under a name prefix, taken one by one with their shapes checked."""

    def __init__(self, tensors: dict, prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = self.prefix + name
        if key not in self.tensors:
            raise UnsupportedCheckpoint(f"the checkpoint has no tensor {key}")
        value = np.asarray(self.tensors[key], np.float32)
        if value.shape != shape:
            raise UnsupportedCheckpoint(f"tensor {key} has shape {value.shape}, config.json "
                                        f"gives {shape}")
        return value

    def get_or(self, name: str, shape: tuple[int, ...], fill: float) -> np.ndarray:
        """A tensor the config may leave out (biases, LayerNorm parameters): `fill` then."""
        if self.prefix + name not in self.tensors:
            return np.full(shape, fill, np.float32)
        return self.get(name, shape)

    def linear(self, name: str, d_in: int, d_out: int) -> np.ndarray:
        """A PyTorch Linear's weight [out, in] as a Flax kernel [in, out]."""
        return self.get(f"{name}.weight", (d_out, d_in)).T

    def norm(self, name: str, d: int) -> dict:
        return {"scale": self.get_or(f"{name}.weight", (d,), 1.0),
                "bias": self.get_or(f"{name}.bias", (d,), 0.0)}


def opt_params(tensors: dict, cfg: TransformerConfig) -> dict:
    """OPT's tensors as the parameter tree of `Transformer(cfg)`."""
    prefix = next((p for p in ("model.decoder.", "decoder.")
                   if p + "embed_tokens.weight" in tensors), None)
    if prefix is None:
        raise UnsupportedCheckpoint("the checkpoint has no model.decoder.embed_tokens.weight "
                                    "(nor decoder.embed_tokens.weight): not an OPT checkpoint")
    w = Weights(tensors, prefix)
    D, E, V = cfg.d_model, cfg.embed_dim or cfg.d_model, cfg.vocab_size
    N = cfg.num_heads
    H = D // N
    params = {"embed": {"embedding": w.get("embed_tokens.weight", (V, E))},
              "pos_embed": w.get("embed_positions.weight", (cfg.position_offset + cfg.max_len, D))}
    if E != D:
        params["project_in"] = {"kernel": w.linear("project_in", E, D)}
        params["project_out"] = {"kernel": w.linear("project_out", D, E)}
    for i, F in enumerate(cfg.layer_widths()):
        layer = f"layers.{i}."
        qkv = [w.linear(f"{layer}self_attn.{n}_proj", D, D) for n in "qkv"]
        qkv_bias = [w.get_or(f"{layer}self_attn.{n}_proj.bias", (D,), 0.0) for n in "qkv"]
        params[f"block_{i}"] = {
            "ln_attn": w.norm(f"{layer}self_attn_layer_norm", D),
            "attn": {
                "qkv": {"kernel": np.stack(qkv, axis=1).reshape(D, 3, N, H),
                        "bias": np.stack(qkv_bias).reshape(3, N, H)},
                "out": {"kernel": w.linear(f"{layer}self_attn.out_proj", D, D).reshape(N, H, D),
                        "bias": w.get_or(f"{layer}self_attn.out_proj.bias", (D,), 0.0)}},
            "ln_mlp": w.norm(f"{layer}final_layer_norm", D),
            "mlp": {"wi": w.linear(f"{layer}fc1", D, F),
                    "bi": w.get_or(f"{layer}fc1.bias", (F,), 0.0),
                    "wo": w.linear(f"{layer}fc2", F, D),
                    "bo": w.get_or(f"{layer}fc2.bias", (D,), 0.0)},
        }
    if cfg.final_norm:
        params["ln_final"] = w.norm("final_layer_norm", D)
    if not cfg.tie_embeddings:
        head = Weights(tensors, "")
        params["unembed"] = {"kernel": head.linear("lm_head", E, V)}
    return params


def llama_params(tensors: dict, cfg: TransformerConfig) -> dict:
    """A Llama-architecture model's tensors as the parameter tree of `Transformer(cfg)`."""
    w = Weights(tensors, "model.")
    D, V, N, K = cfg.d_model, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads
    H = D // N
    params = {"embed": {"embedding": w.get("embed_tokens.weight", (V, D))},
              "ln_final": {"scale": w.get("norm.weight", (D,))}}
    for i, F in enumerate(cfg.layer_widths()):
        layer = f"layers.{i}."
        attn = f"{layer}self_attn."
        q = {"kernel": w.linear(f"{attn}q_proj", D, N * H).reshape(D, N, H)}
        kv = {"kernel": np.stack([w.linear(f"{attn}{n}_proj", D, K * H) for n in "kv"],
                                 axis=1).reshape(D, 2, K, H)}
        out = {"kernel": w.linear(f"{attn}o_proj", N * H, D).reshape(N, H, D)}
        if cfg.attention_bias:
            q["bias"] = w.get(f"{attn}q_proj.bias", (N * H,)).reshape(N, H)
            kv["bias"] = np.stack([w.get(f"{attn}{n}_proj.bias", (K * H,)) for n in "kv"]
                                  ).reshape(2, K, H)
            out["bias"] = w.get(f"{attn}o_proj.bias", (D,))
        params[f"block_{i}"] = {
            "ln_attn": {"scale": w.get(f"{layer}input_layernorm.weight", (D,))},
            "attn": {"q": q, "kv": kv, "out": out},
            "ln_mlp": {"scale": w.get(f"{layer}post_attention_layernorm.weight", (D,))},
            "mlp": {"wg": w.linear(f"{layer}mlp.gate_proj", D, F),
                    "wu": w.linear(f"{layer}mlp.up_proj", D, F),
                    "wd": w.linear(f"{layer}mlp.down_proj", F, D)},
        }
    if not cfg.tie_embeddings:
        params["unembed"] = {"kernel": Weights(tensors, "").linear("lm_head", D, V)}
    return params


FAMILIES = {"opt": (opt_config, opt_params), "llama": (llama_config, llama_params)}


def load_hf(folder: str | Path, *, instrument: str = "xla", dtype: str = "float32"
            ) -> tuple[TransformerConfig, dict]:
    """(config, params) of the Hugging Face checkpoint in `folder`, for `Transformer(config)`.
    Raises UnsupportedCheckpoint (a ValueError) with one line before reading any weight when
    the config asks for what the model cannot do."""
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    make_config, make_params = FAMILIES[require(hf_config, "model_type", tuple(FAMILIES))]
    cfg = make_config(hf_config, instrument=instrument, dtype=dtype)
    return cfg, make_params(read_tensors(folder), cfg)


def export_family(cfg: TransformerConfig) -> str:
    """"opt" or "llama": the Hugging Face layout that holds the model exactly; an
    UnsupportedCheckpoint line saying what differs from both otherwise."""
    if cfg.live is not None:
        raise UnsupportedCheckpoint("a model with live units (mask mode) exports once "
                                    "compacted: export its compacted widths")
    opt = {"mlp": "relu", "norm": "layernorm", "positions": "learned", "norm_eps": OPT_NORM_EPS,
           "position_offset": OPT_POSITION_OFFSET, "num_kv_heads": None,
           "attention_bias": True}
    llama = {"mlp": "gated", "norm": "rmsnorm", "positions": "rope", "post_norm": False,
             "final_norm": True, "embed_dim": None}
    differ = {name: [f"{k}={getattr(cfg, k)!r}" for k, v in want.items()
                     if getattr(cfg, k) != v] for name, want in (("OPT", opt), ("Llama", llama))}
    if cfg.post_norm and cfg.final_norm:
        differ["OPT"].append("a final norm after post-LN blocks")
    if cfg.num_kv_heads is None:
        differ["Llama"].append("one fused qkv projection")
    if cfg.output_bias and not cfg.tie_embeddings:
        for keys in differ.values():
            keys.append("a bias in the output layer")
    if not differ["OPT"]:
        return "opt"
    if not differ["Llama"]:
        return "llama"
    said = "; ".join(f"from {name}'s in {', '.join(keys)}" for name, keys in differ.items())
    raise UnsupportedCheckpoint(f"only models of OPT's or Llama's layout export; this one "
                                f"differs {said}")


def opt_hf_config(cfg: TransformerConfig, ffn_dim: int) -> dict:
    """The config.json of `cfg` as OPT, every layer at width ffn_dim."""
    return {
        "model_type": "opt", "architectures": ["OPTForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "ffn_dim": ffn_dim, "max_position_embeddings": cfg.max_len,
        "word_embed_proj_dim": cfg.embed_dim or cfg.d_model,
        "do_layer_norm_before": not cfg.post_norm,
        "_remove_final_layer_norm": not cfg.post_norm and not cfg.final_norm,
        "activation_function": "relu", "enable_bias": True,
        "layer_norm_elementwise_affine": True, "tie_word_embeddings": cfg.tie_embeddings,
        "dropout": 0.0, "attention_dropout": 0.0, "torch_dtype": "float32",
    }


def llama_hf_config(cfg: TransformerConfig, ffn_dim: int) -> dict:
    """The config.json of `cfg` as a Llama-architecture model with a ReLU gate."""
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.d_model // cfg.num_heads,
        "intermediate_size": ffn_dim, "max_position_embeddings": cfg.max_len,
        "hidden_act": "relu", "rms_norm_eps": cfg.norm_eps, "mlp_bias": False,
        "attention_bias": cfg.attention_bias, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta, "attention_dropout": 0.0, "torch_dtype": "float32",
    }


def pad_units(a: np.ndarray, axis: int, width: int) -> np.ndarray:
    """a with zero units appended along `axis` up to `width`."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, width - a.shape[axis])
    return np.pad(a, pad)


def opt_tensors(cfg: TransformerConfig, params: dict, ffn_dim: int) -> dict[str, np.ndarray]:
    """`Transformer(cfg)`'s parameters as OPT's tensors, every MLP zero-padded to ffn_dim units:
    a zero unit (zero weights in and out, zero bias) adds nothing to the output."""
    p = jax_free(params)
    D = cfg.d_model
    out = {"embed_tokens.weight": p["embed"]["embedding"],
           "embed_positions.weight": p["pos_embed"]}
    if "project_in" in p:
        out["project_in.weight"] = p["project_in"]["kernel"].T
        out["project_out.weight"] = p["project_out"]["kernel"].T
    for i in range(cfg.num_layers):
        block, layer = p[f"block_{i}"], f"layers.{i}."
        qkv, qkv_bias = block["attn"]["qkv"]["kernel"], block["attn"]["qkv"]["bias"]
        for j, name in enumerate("qkv"):
            out[f"{layer}self_attn.{name}_proj.weight"] = qkv[:, j].reshape(D, D).T
            out[f"{layer}self_attn.{name}_proj.bias"] = qkv_bias[j].reshape(D)
        out[f"{layer}self_attn.out_proj.weight"] = block["attn"]["out"]["kernel"].reshape(D, D).T
        out[f"{layer}self_attn.out_proj.bias"] = block["attn"]["out"]["bias"]
        mlp = block["mlp"]
        out[f"{layer}fc1.weight"] = pad_units(mlp["wi"], 1, ffn_dim).T
        out[f"{layer}fc1.bias"] = pad_units(mlp["bi"], 0, ffn_dim)
        out[f"{layer}fc2.weight"] = pad_units(mlp["wo"], 0, ffn_dim).T
        out[f"{layer}fc2.bias"] = mlp["bo"]
        for ours, theirs in (("ln_attn", "self_attn_layer_norm"), ("ln_mlp", "final_layer_norm")):
            out[f"{layer}{theirs}.weight"] = block[ours]["scale"]
            out[f"{layer}{theirs}.bias"] = block[ours]["bias"]
    if cfg.final_norm:
        out["final_layer_norm.weight"] = p["ln_final"]["scale"]
        out["final_layer_norm.bias"] = p["ln_final"]["bias"]
    tensors = {f"model.decoder.{k}": v for k, v in out.items()}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = output_layer(p)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def llama_tensors(cfg: TransformerConfig, params: dict, ffn_dim: int) -> dict[str, np.ndarray]:
    """`Transformer(cfg)`'s parameters as a Llama-architecture model's tensors, every MLP
    zero-padded to ffn_dim units (a zero gate is 0 after the ReLU: the unit adds nothing)."""
    p = jax_free(params)
    D = cfg.d_model
    out = {"embed_tokens.weight": p["embed"]["embedding"], "norm.weight": p["ln_final"]["scale"]}
    for i in range(cfg.num_layers):
        block, layer = p[f"block_{i}"], f"layers.{i}."
        attn, mlp = block["attn"], block["mlp"]
        out[f"{layer}self_attn.q_proj.weight"] = attn["q"]["kernel"].reshape(D, -1).T
        for j, name in enumerate("kv"):
            out[f"{layer}self_attn.{name}_proj.weight"] = attn["kv"]["kernel"][:, j].reshape(
                D, -1).T
        out[f"{layer}self_attn.o_proj.weight"] = attn["out"]["kernel"].reshape(-1, D).T
        if cfg.attention_bias:
            out[f"{layer}self_attn.q_proj.bias"] = attn["q"]["bias"].reshape(-1)
            for j, name in enumerate("kv"):
                out[f"{layer}self_attn.{name}_proj.bias"] = attn["kv"]["bias"][j].reshape(-1)
            out[f"{layer}self_attn.o_proj.bias"] = attn["out"]["bias"]
        out[f"{layer}mlp.gate_proj.weight"] = pad_units(mlp["wg"], 1, ffn_dim).T
        out[f"{layer}mlp.up_proj.weight"] = pad_units(mlp["wu"], 1, ffn_dim).T
        out[f"{layer}mlp.down_proj.weight"] = pad_units(mlp["wd"], 0, ffn_dim).T
        out[f"{layer}input_layernorm.weight"] = block["ln_attn"]["scale"]
        out[f"{layer}post_attention_layernorm.weight"] = block["ln_mlp"]["scale"]
    tensors = {f"model.{k}": v for k, v in out.items()}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = output_layer(p)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def output_layer(p: dict) -> np.ndarray:
    """The untied output layer as PyTorch's lm_head weight (export_family has checked that it
    has no bias)."""
    return p["unembed"]["kernel"].T


EXPORTS = {"opt": (opt_hf_config, opt_tensors), "llama": (llama_hf_config, llama_tensors)}


def jax_free(params: dict) -> dict:
    """The parameter tree as host float32 numpy arrays."""
    if isinstance(params, dict):
        return {k: jax_free(v) for k, v in params.items()}
    return np.asarray(params, np.float32)


def save_hf(cfg: TransformerConfig, params: dict, folder: str | Path,
            extra: dict | None = None) -> Path:
    """Writes `Transformer(cfg)` with `params` as a Hugging Face folder (config.json,
    model.safetensors) of OPT or of a ReLU-gated Llama-architecture model, which `transformers`
    loads. Per-layer widths (a compacted model) are zero-padded to the widest layer, since those
    configs hold one width; the logits do not change. `extra`: more config.json fields (the
    special token ids of the checkpoint it was imported from). Refuses (before writing
    anything) a model neither layout holds."""
    from safetensors.numpy import save_file

    make_config, make_tensors = EXPORTS[export_family(cfg)]
    ffn_dim = max(cfg.layer_widths())
    tensors = make_tensors(cfg, params, ffn_dim)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {**make_config(cfg, ffn_dim), **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder
