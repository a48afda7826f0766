"""The learning-rate schedule against the formula by hand: linear warm-up, then a cosine that
reaches peak * end_lr_ratio at train.decay_steps (the run's length by default), so that a run
can follow a longer schedule (the paper's 1M steps) and stop early."""

import math

import pytest

from relu_sparsity.train import steps
from relu_sparsity.train.config import preset, validate


def by_hand(step: int, peak: float, warmup: int, decay: int, end_ratio: float) -> float:
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, decay - warmup) / (decay - warmup)
    return peak * (end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("decay_steps, end_ratio", [(None, 0.0), (1_000_000, 0.0),
                                                    (20_000, 0.1)])
def test_the_schedule_is_warmup_then_a_cosine_to_decay_steps(decay_steps, end_ratio):
    overrides = ["train.steps=9000", "train.warmup_steps=5000", "train.peak_lr=3e-3",
                 f"train.end_lr_ratio={end_ratio}"]
    if decay_steps is not None:
        overrides.append(f"train.decay_steps={decay_steps}")
    config = preset("tiny", overrides)
    decay = decay_steps or 9000
    for step in (0, 2500, 5000, 7000, 8999, decay, decay + 100):
        want = by_hand(step, 3e-3, 5000, decay, end_ratio)
        assert steps.learning_rate(config, step) == pytest.approx(want, rel=1e-5, abs=1e-9)  # f32


def test_the_papers_cosine_keeps_the_rate_near_its_peak_through_a_short_run():
    config = preset("tiny", ["train.steps=9000", "train.warmup_steps=5000",
                             "train.peak_lr=3e-3", "train.decay_steps=1000000"])
    assert steps.learning_rate(config, 8999) > 0.9999 * 3e-3


@pytest.mark.parametrize("decay_steps", [0, 60])
def test_a_decay_that_ends_within_the_warmup_is_refused(decay_steps):
    with pytest.raises(ValueError, match="train.decay_steps must exceed train.warmup_steps 60"):
        validate(preset("tiny", [f"train.decay_steps={decay_steps}"]))
