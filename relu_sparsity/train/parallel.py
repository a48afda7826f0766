"""Data parallelism over the devices of this process: the state is replicated, each device takes
`train.batch_size` consecutive sequences of the global batch, and XLA (GSPMD) partitions the
jitted step and all-reduces the gradients."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


class DataParallel:
    """The mesh and placements; with one device, arrays are placed as they are."""

    def __init__(self):
        self.num_devices = jax.device_count()
        # Auto axes: XLA propagates the batch sharding through the model (no sharding types).
        self.mesh = jax.make_mesh((self.num_devices,), ("data",),
                                  axis_types=(jax.sharding.AxisType.Auto,))
        self.replicated = jax.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.sharded = jax.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

    def batch(self, tokens: np.ndarray) -> jax.Array:
        if self.num_devices == 1:
            return jnp.asarray(tokens)
        return jax.device_put(tokens, self.sharded)

    def state(self, state):
        return state if self.num_devices == 1 else jax.device_put(state, self.replicated)

    def tracing(self):
        """The context to trace the step in: the mesh, so that fused kernels run per device
        inside shard_map (model/mlp.py)."""
        return jax.set_mesh(self.mesh) if self.num_devices > 1 else contextlib.nullcontext()
