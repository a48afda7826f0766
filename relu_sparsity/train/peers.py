"""The other processes of a multi-process run: noticing that one is gone, and leaving together.

JAX's coordination service, left to itself, aborts every survivor with a C++ stack trace once a
process misses its heartbeats (an abort Python cannot intercept). The run instead starts the
service as recoverable, so that no survivor is aborted, and watches the peers itself: a thread
asks the service which processes are alive and, when one is gone, hands a one-line description
to the caller's `on_lost`, which ends the process. A recoverable service no longer holds a
finishing process until the others finish, so `leave_together` does that: a barrier, then
process 0 (which hosts the service) waits for the others to disconnect before it ends.
"""

import logging
import threading
import time
from collections.abc import Callable

import jax
from jax._src import distributed

log = logging.getLogger(__name__)

EXIT_BARRIER = "relu_sparsity_exit"
EXIT_BARRIER_TIMEOUT_S = 30 * 60  # process 0 writes the report while the others wait
REFUSED_WAIT_S = 10
DISCONNECT_TIMEOUT_S = 30


def recoverable_service() -> None:
    """Before jax.distributed.initialize: a service that does not abort the survivors."""
    jax.config.update("jax_enable_recoverability", True)


def _client():
    return distributed.global_state.client


class PeerWatch(threading.Thread):
    """Polls the coordination service every `interval_s`; calls `on_lost(description)` once when
    a process is no longer alive or the service (process 0) cannot be reached."""

    def __init__(self, on_lost: Callable[[str], None], interval_s: float):
        super().__init__(name="peer-watch", daemon=True)
        self.on_lost = on_lost
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.processes = list(range(jax.process_count()))

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            gone = self.gone()
            if gone and not self.stopped.is_set():
                self.on_lost(gone)
                return

    def gone(self) -> str | None:
        try:
            alive = _client().get_live_nodes(self.processes)
        except Exception as err:  # the service runs in process 0
            return f"process 0 (the coordinator) cannot be reached: {first_line(err)}"
        missing = [p for p in self.processes if p not in alive]
        if not missing:
            return None
        return f"process {', '.join(map(str, missing))} stopped sending heartbeats"

    def stop(self) -> None:
        self.stopped.set()


_watch: PeerWatch | None = None


def watch(on_lost: Callable[[str], None], heartbeat_timeout_s: int) -> None:
    """Starts watching the other processes (a multi-process run only)."""
    global _watch
    if jax.process_count() == 1 or _watch is not None:
        return
    _watch = PeerWatch(on_lost, interval_s=min(1.0, heartbeat_timeout_s / 4))
    _watch.start()


def leave_together(timeout_s: float = EXIT_BARRIER_TIMEOUT_S) -> None:
    """At the end of a command: waits up to `timeout_s` for every process to get here, then, on
    process 0, for the others to disconnect, so that none of them loses the service while it
    shuts down. A process that refused to start waits briefly: its peers may be blocked in a
    collective with it, and notice that it is gone only once it ends. A no-op without a watch."""
    global _watch
    if _watch is None:
        return
    client = _client()
    try:
        client.wait_at_barrier(EXIT_BARRIER, int(timeout_s * 1000))
    except Exception as err:  # a peer that did not come: nothing left to wait for
        log.debug("exit barrier: %s", first_line(err))
        return
    finally:
        _watch.stop()
        _watch = None
    if jax.process_index() != 0:
        distributed.shutdown()  # disconnects while the service still runs
        return
    # Returns once every other process has called it or disconnected: the latter here.
    waiting = threading.Thread(target=client.get_live_nodes,
                               args=(list(range(jax.process_count())),), daemon=True)
    waiting.start()
    waiting.join(DISCONNECT_TIMEOUT_S)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
