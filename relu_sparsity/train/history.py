"""Every unit's life over every training step, kept on the device (docs/design.md §6).

Per layer and unit, in original unit ids: the first and the last step the unit was used by the
global batch, the number of steps it was used, the longest run of steps it was off between two
steps it was used (a unit that "came back"), and the last step it came back after at least
`train.prune_window` steps off (what `--prune-at auto` waits on). The train step updates them
from the batch's sequence counts, with no transfer to the host; the host reads them at logged
steps (`units.npz`) and they travel in the checkpoint.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np


HISTORY_FIELDS = ("first_on", "last_on", "on_steps", "longest_off", "last_return")


@flax.struct.dataclass
class UnitHistory:
    first_on: jax.Array  # int32 [F]: the first step the unit was used, -1 while never
    last_on: jax.Array  # int32 [F]: the last step it was used, -1 while never
    on_steps: jax.Array  # int32 [F]: steps it was used
    longest_off: jax.Array  # int32 [F]: the longest run of steps off between two used steps
    last_return: jax.Array  # int32 [F]: the last step it was used after `window` steps off, -1


def empty_history(widths: tuple[int, ...]) -> tuple[UnitHistory, ...]:
    """Per layer of original width F: no unit used yet."""
    def layer(width):
        # A buffer per field, none shared: the train step donates each.
        never = lambda: jnp.full((width,), -1, jnp.int32)  # noqa: E731
        zeros = lambda: jnp.zeros((width,), jnp.int32)  # noqa: E731
        return UnitHistory(never(), never(), zeros(), zeros(), never())

    return tuple(layer(w) for w in widths)


def batch_used(seq_count: jax.Array, num_units: int, unit_ids: np.ndarray | None) -> jax.Array:
    """bool [F]: the units the whole batch used, from its sequence counts [n_seq, F_computed];
    `unit_ids` maps computed column j < len(unit_ids) to its original id (compacted layers: the
    kept units first, then padding), None when the columns are the original units. (A max over
    the counts, not an OR of the mask words: XLA's CPU all-reduce has no bitwise OR, and the
    sequences may be spread over devices.)"""
    used = jnp.max(seq_count, axis=0) > 0
    if unit_ids is None:
        return used
    return jnp.zeros((num_units,), bool).at[jnp.asarray(unit_ids)].set(used[:len(unit_ids)])


def update(history: UnitHistory, used: jax.Array, step: jax.Array, window: int
           ) -> UnitHistory:
    """The history after `step`, in which the batch used the units `used`; a unit used again
    after at least `window` steps off "returns"."""
    came_back = used & (history.last_on >= 0)
    gap = step - history.last_on - 1
    return UnitHistory(
        first_on=jnp.where(used & (history.first_on < 0), step, history.first_on),
        last_on=jnp.where(used, step, history.last_on),
        on_steps=history.on_steps + used.astype(jnp.int32),
        longest_off=jnp.where(came_back, jnp.maximum(history.longest_off, gap),
                              history.longest_off),
        last_return=jnp.where(came_back & (gap >= window), step, history.last_return))


def update_all(histories: tuple[UnitHistory, ...], stats, unit_ids, step, valid, window: int):
    """Every layer's history after `step`; unchanged where `valid` is False (a step whose loss
    is not finite: its statistics are not the model's use)."""
    out = []
    for history, layer_stats, ids in zip(histories, stats, unit_ids, strict=True):
        used = batch_used(layer_stats.seq_count, history.first_on.shape[0], ids)
        new = update(history, used, step, window)
        out.append(jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, history))
    return tuple(out)


def to_arrays(histories) -> dict[str, np.ndarray]:
    """`units.npz`'s arrays: `<field>_<layer>` for every field and layer."""
    return {f"{field}_{i}": np.asarray(getattr(h, field))
            for i, h in enumerate(histories) for field in HISTORY_FIELDS}


def _layers(units: dict) -> range:
    """The layers of `to_arrays`' host arrays."""
    return range(sum(1 for key in units if key.startswith("last_on_")))


def dead_units(units: dict, step: int, window: int) -> list[np.ndarray]:
    """Per layer, bool [F]: units unused over the `window` steps up to `step` (host arrays of
    `to_arrays`)."""
    return [units[f"last_on_{i}"] < step - window + 1 for i in _layers(units)]


def auto_prune_ready(units: dict, step: int, window: int) -> bool:
    """`--prune-at auto`: at least one unit has been unused for `window` steps, and no unit came
    back after `window` steps off within the last `window` steps (the unused set is stable)."""
    if step < 2 * window - 1:
        return False
    returned = any((units[f"last_return_{i}"] > step - window).any() for i in _layers(units))
    return not returned and any(d.any() for d in dead_units(units, step, window))
