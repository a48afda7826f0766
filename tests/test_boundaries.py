"""Input checks at their limits, not far from them: the last step a prune may happen at, and the
memory lower bound one byte either side of a faked device's memory, against a bound recomputed
from the model's own parameters and a hand count of its activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.model import Transformer
from relu_sparsity.train import preflight, steps
from relu_sparsity.train.config import preset

STEPS = 10


@pytest.mark.parametrize("prune_at", [0, STEPS - 2])
def test_prune_at_up_to_two_before_the_last_step_is_accepted(prune_at):
    """train.prune_at in [0, steps - 2] validates (a step after the prune step remains)."""
    config = preset("tiny", [f"train.steps={STEPS}", "train.prune=mask",
                             f"train.prune_at={prune_at}"])
    assert config.train.prune_at == prune_at


@pytest.mark.parametrize("prune_at", [-1, STEPS - 1, STEPS])
def test_prune_at_the_last_step_is_refused(prune_at):
    """train.prune_at = steps - 1 (no step left after it), steps, or -1 is refused by name."""
    with pytest.raises(ValueError, match="train.prune_at"):
        preset("tiny", [f"train.steps={STEPS}", "train.prune=mask", f"train.prune_at={prune_at}"])


VOCAB = 96
# d_model 16, 2 heads, widths 32 and 48, 3 sequences of 8 tokens, float32.
SMALL = ["model.num_layers=2", "model.d_model=16", "model.num_heads=2", "model.d_ff=[32,48]",
         "model.seq_len=8", "train.batch_size=3", f"data.vocab_size={VOCAB}",
         "model.dtype=float32"]


def hand_bound(config) -> int:
    """Parameters counted from the model's own initialized shapes, 4 bytes each for the
    parameters, gradients and two Adam moments; activations by hand: hidden layers
    24 tokens x (32 + 48) units x 4 bytes, attention scores 2 layers x 3 x 2 heads x 8 x 8 x 4
    bytes, logits and their gradient 2 x 24 x 96 x 4 bytes."""
    model = Transformer(steps.model_config(config, VOCAB))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    activations = 24 * 80 * 4 + 2 * 3 * 2 * 8 * 8 * 4 + 2 * 24 * 96 * 4
    return 4 * 4 * count + activations


@pytest.mark.parametrize("tied", [True, False])
def test_memory_bound_one_byte_either_side_of_the_device(monkeypatch, tied):
    """A device of exactly the bound's bytes runs; one of a byte less is refused with every
    term named."""
    config = preset("tiny", [*SMALL, f"model.tie_embeddings={str(tied).lower()}"])
    need = hand_bound(config)
    terms = preflight.memory_lower_bound(config, VOCAB, 4)
    assert sum(terms.values()) == need
    monkeypatch.setattr(preflight, "device_memory", lambda: ("fake device", need))
    preflight.check_memory(config, VOCAB, "float32")  # fits exactly
    monkeypatch.setattr(preflight, "device_memory", lambda: ("fake device", need - 1))
    with pytest.raises(ValueError) as refused:
        preflight.check_memory(config, VOCAB, "float32")
    message = str(refused.value)
    for term in ("parameters", "gradients", "first moment", "second moment", "activations"):
        assert term in message, term
    assert f"({need} bytes)" in message and f"({need - 1} bytes)" in message
    assert "fake device" in message and "model.d_ff" in message and "\n" not in message


def test_memory_bound_counts_bfloat16_hidden_layers_at_two_bytes(monkeypatch):
    """With bfloat16 compute the hidden layers count 2 bytes a unit: the float32 bound less
    24 tokens x 80 units x 2 bytes."""
    config = preset("tiny", SMALL)
    need = hand_bound(config) - 24 * 80 * 2
    assert sum(preflight.memory_lower_bound(config, VOCAB, 2).values()) == need
    monkeypatch.setattr(preflight, "device_memory", lambda: ("fake device", need))
    preflight.check_memory(config, VOCAB, "bfloat16")
    monkeypatch.setattr(preflight, "device_memory", lambda: ("fake device", need - 1))
    with pytest.raises(ValueError, match="does not fit"):
        preflight.check_memory(config, VOCAB, "bfloat16")
