"""Flax decoder-only ReLU Transformer whose MLPs report their activation sparsity."""

from relu_sparsity.model.mlp import INSTRUMENT_MODES, GatedReluMLP, ReluMLP
from relu_sparsity.model.transformer import Transformer, TransformerConfig, layer_stats

__all__ = ["INSTRUMENT_MODES", "GatedReluMLP", "ReluMLP", "Transformer", "TransformerConfig",
           "layer_stats"]
