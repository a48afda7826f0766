"""Tensor parallelism for d_ff: the MLP's width is split over a `model` mesh axis, so that layers
wider than one device's memory or compute can train. Every MLP weight indexed by a hidden unit
(in the parameters and in the optimizer's moments) is sharded along F; everything else is
replicated.

The mesh is `jax.make_mesh((n_data, n_model), ("data", "model"))`; the train step is traced
inside `jax.set_mesh(mesh)` (model/mlp.py then runs the hidden layer per width shard) with the
state placed by `shard_state` and the batch sharded `PartitionSpec("data")`.
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec

from relu_sparsity.train.pruning import mlp_leaf

# The MLP's hidden-unit axis in each of its weights: ReluMLP's wi [D, F], bi [F], wo [F, D];
# GatedReluMLP's wg and wu [D, F] split like wi, bg [F] like bi, wd [F, D] like wo.
WIDTH_SPECS = {
    "wi": PartitionSpec(None, "model"),
    "bi": PartitionSpec("model"),
    "wo": PartitionSpec("model", None),
    "wg": PartitionSpec(None, "model"),
    "wu": PartitionSpec(None, "model"),
    "bg": PartitionSpec("model"),
    "wd": PartitionSpec("model", None),
}


def leaf_spec(path) -> PartitionSpec:
    """The spec of the leaf at `path`: an MLP weight `block_<i>/mlp/{wi,bi,wo}` (or a gated
    MLP's `{wg,wu,bg,wd}`; wherever it sits in the tree: params, the optimizer's mu and nu) is
    split along F, the rest replicated."""
    found = mlp_leaf(path)
    return WIDTH_SPECS[found[1]] if found else PartitionSpec()


def state_shardings(tree, mesh: jax.sharding.Mesh):
    """A NamedSharding on `mesh` per array of `tree` (the Flax params, or a whole TrainState):
    the MLP weights split over the `model` axis, everything else replicated. A mesh without a
    `model` axis replicates everything."""
    split = "model" in mesh.axis_names

    def sharding(path, leaf):
        del leaf
        return NamedSharding(mesh, leaf_spec(path) if split else PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding, tree)


def shard_state(tree, mesh: jax.sharding.Mesh):
    """`tree` placed on `mesh` by `state_shardings`."""
    return jax.device_put(tree, state_shardings(tree, mesh))
