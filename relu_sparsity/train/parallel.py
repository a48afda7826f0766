"""Where a run's arrays live: one global mesh over the devices of every process (JAX's
multi-controller runtime), with a `data` axis (each device takes `train.batch_size` consecutive
sequences of the global batch) and a `model` axis (the MLP's width split over devices,
train/sharding.py). The jitted step is partitioned by XLA (GSPMD), which all-reduces the gradients.

Every process runs the same program. Each reads only its own rows of a global batch and
assembles the global array with `jax.make_array_from_process_local_data`; values the host needs
(metrics, masks, checkpoint checks) are gathered from every process with
`multihost_utils.process_allgather`.
"""

import contextlib
import logging
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from relu_sparsity.train import peers
from relu_sparsity.train.sharding import shard_state, state_shardings

log = logging.getLogger(__name__)


def start_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, heartbeat_timeout_s: int = 100,
                    on_lost_peer: Callable[[str], None] | None = None) -> None:
    """`jax.distributed.initialize` with the given arguments; with none of them, JAX's own
    cluster detection (SLURM, TPU pods, Kubernetes, Open MPI), and one process where it finds
    no cluster. A process that stops sending heartbeats for `heartbeat_timeout_s` is declared
    dead, and `on_lost_peer` gets a line saying which (train/peers.py); it must end the
    process, since the collectives of the run can no longer complete."""
    explicit = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in explicit):
        _recoverable_if(on_lost_peer)
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    elif not _backends_started():
        _recoverable_if(on_lost_peer)
        try:
            jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
        except ValueError:  # JAX found no cluster: "coordinator_address should be defined"
            log.debug("no cluster detected: one process")
            return
    if jax.process_count() > 1:
        log.info("process %d of %d; %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
        if on_lost_peer is not None:
            peers.watch(on_lost_peer, heartbeat_timeout_s)


def _recoverable_if(on_lost_peer) -> None:
    """Survivors that handle a lost peer themselves are not aborted by the service."""
    if on_lost_peer is not None:
        peers.recoverable_service()


def _backends_started() -> bool:
    """jax.distributed must start before JAX's backends; a caller that has used JAX already
    (tests, notebooks calling the CLI in-process) runs as one process."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


class Parallel:
    """The global mesh, the placements and the transfers between hosts and devices."""

    def __init__(self, model_parallel: int = 1):
        self.num_processes = jax.process_count()
        self.is_primary = jax.process_index() == 0
        if jax.device_count() % model_parallel:
            raise ValueError(f"train.model_parallel={model_parallel} does not divide the "
                             f"{jax.device_count()} devices")
        self.num_model = model_parallel
        self.num_data = jax.device_count() // model_parallel  # device batches per step
        self.num_devices = jax.device_count()
        # Auto axes: XLA propagates the batch and width shardings through the model.
        self.mesh = jax.make_mesh((self.num_data, self.num_model), ("data", "model"),
                                  axis_types=(jax.sharding.AxisType.Auto,) * 2)
        self.sharded = NamedSharding(self.mesh, PartitionSpec("data"))

    @property
    def single_device(self) -> bool:
        return self.num_devices == 1

    # Batches -------------------------------------------------------------------------------
    def rows(self, global_batch: int) -> slice:
        """This process's rows of a global batch of `global_batch` sequences."""
        index = self.sharded.addressable_devices_indices_map((global_batch, 1))
        bounds = [i[0].indices(global_batch)[:2] for i in index.values()]
        return slice(min(b[0] for b in bounds), max(b[1] for b in bounds))

    def place_rows(self, local_tokens: np.ndarray, global_batch: int) -> jax.Array:
        """The global batch [global_batch, ...] from this process's rows of it."""
        if self.single_device:
            return jax.numpy.asarray(local_tokens)
        shape = (global_batch, *local_tokens.shape[1:])
        return jax.make_array_from_process_local_data(self.sharded, local_tokens, shape)

    def place(self, tokens: np.ndarray) -> jax.Array:
        """A global batch every process holds whole (evaluation batches)."""
        return self.place_rows(tokens[self.rows(tokens.shape[0])], tokens.shape[0])

    # State ---------------------------------------------------------------------------------
    def state(self, state):
        """The train state on the mesh: replicated, the MLP's width split over `model`."""
        if self.single_device:
            return state
        if self.num_processes > 1:  # device_put reads host values the same on every process
            state = jax.device_get(state)  # a fresh or host-cut state: local arrays
        return shard_state(state, self.mesh)

    def abstract(self, shapes):
        """`shapes` (jax.ShapeDtypeStruct leaves) with the placements `state` gives them, for
        reading a checkpoint straight onto the devices."""
        if self.single_device:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, shapes)
        else:
            shardings = state_shardings(shapes, self.mesh)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)

    def fetch(self, tree):
        """Host numpy values of `tree`, gathered from every process."""
        if self.num_processes == 1:
            return jax.device_get(tree)
        return multihost_utils.process_allgather(tree, tiled=True)

    def any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on any process (all processes must call it together)."""
        if self.num_processes == 1:
            return flag
        flags = multihost_utils.process_allgather(np.array([flag]))
        return bool(np.any(flags))

    def tracing(self):
        """The context to trace the step in: the mesh, so that fused kernels run per device
        (and per width shard) inside shard_map (model/mlp.py)."""
        return contextlib.nullcontext() if self.single_device else jax.set_mesh(self.mesh)

