"""Training a run, as the paper's procedure: at every step a batch, the forward pass with its
statistics and one update; at logged steps the per-layer metrics and batch masks; at the prune
step the units the batch did not use are dropped; checkpoints on the way, so that a run folder
that is started again resumes where it stopped (docs/design.md §8).

Statistics reach the host only at logged steps: the loop queues steps without waiting for them.
A run ends in one of three ways: finished (train returns), diverged (`Diverged`: a non-finite
loss or gradient norm; no checkpoint holds a non-finite value) or interrupted (`Interrupted`:
Ctrl-C or SIGTERM, after a checkpoint; run again to resume). Each has its exit status
(`EXIT_STATUS`).
"""

import contextlib
import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from relu_sparsity.data import TokenCache, open_cache
from relu_sparsity.kernels import resolve_fused_backend
from relu_sparsity.kernels.bits import np_or_rows, np_pack_bits
from relu_sparsity.model import Transformer
from relu_sparsity.runs.checkpoints import Checkpoints, NoReadableCheckpoint
from relu_sparsity.runs import lock
from relu_sparsity.runs.folder import LOCK_FILE, FollowerFolder, RunFolder
from relu_sparsity.runs.metadata import CORPUS_KEYS, run_metadata
from relu_sparsity.runs.reader import PROFILE_HLO_FILE, PROFILE_STEPS_FILE
from relu_sparsity.runs.tensorboard import EventLog
from relu_sparsity.train.config import Config, from_dict, to_dict, validate
from relu_sparsity.train.history import auto_prune_ready, dead_units, to_arrays
from relu_sparsity.train.imported import with_imported_params
from relu_sparsity.train.metrics import UnitStates, layer_records
from relu_sparsity.train.parallel import Parallel
from relu_sparsity.train.preflight import check_memory, check_splits
from relu_sparsity.train.pruning import Pruning, choose_units, compact_tree
from relu_sparsity.train.steps import (
    NO_COMMAND_BUFFERS,
    all_finite,
    attention_of,
    build_program,
    compute_dtype,
    evaluate,
    init_state,
    learning_rate,
    make_optimizer,
    model_config,
)

log = logging.getLogger(__name__)

# The command's exit status for each way a run ends (2: refused before any work).
EXIT_STATUS = {"finished": 0, "refused": 2, "diverged": 3, "interrupted": 75}


class TrainingStopped(Exception):
    """A run that ended before its last step; `status` names how (EXIT_STATUS)."""
    status = "stopped"


class Diverged(TrainingStopped):
    status = "diverged"


class Interrupted(TrainingStopped):
    status = "interrupted"


def train(config: Config, run_dir: str | Path, *, allow_config_change: bool = False,
          progress: bool = True, max_steps: int | None = None, start_over: bool = False,
          profile_steps: tuple[int, int] | None = None) -> Path:
    """Train `config` in `run_dir`, resuming it if it holds a checkpoint. Returns the folder.

    Everything that can refuse the run (the configuration, the fused backend, memory, the token
    cache) is checked before the folder is created. max_steps stops (with a checkpoint) after
    that many steps of this call, for tests and for splitting long runs; the run resumes where it
    stopped. start_over discards the folder's checkpoints, metrics and masks first.
    profile_steps (A, B) records a jax.profiler trace of steps A .. B - 1 in the folder's
    `profile/` (TensorBoard's profile plugin or Perfetto read it). Raises Diverged or Interrupted
    when the run ends early.
    """
    validate(config)
    check_profile_steps(profile_steps, config.train.steps)
    backend = resolve_fused_backend(config.kernel) if config.instrument == "fused" \
        else "reference"
    attention = attention_of(config)
    check_memory(config, config.data.vocab_size, compute_dtype(config))
    cache = open_cache(config.data.source, config.data.vocab_size, config.data.cache)
    check_splits(config, cache)
    parallel = Parallel(config.train.model_parallel)
    config = with_absolute_cache(config)
    corpus = {k: cache.meta.get(k) for k in CORPUS_KEYS}
    folder = open_run_folder(run_dir, config, allow_config_change, parallel.is_primary, corpus)
    with lock.held(folder.path / LOCK_FILE, f"run folder {folder.path}",
                   take=parallel.is_primary):
        if start_over:
            folder.clear()
        checkpoints = Checkpoints(folder.checkpoints, config.train.keep_checkpoints,
                                  start_over=start_over)
        with checkpoints:  # closing it completes the save in flight
            trainer = Trainer(config, folder, checkpoints, cache, parallel, profile_steps)
            # Written once the checkpoint fits: a refused resume leaves the config as it was.
            folder.write_config(run_metadata(to_dict(config), cache.meta, cache.path,
                                             dtype=compute_dtype(config), backend=backend))
            log.info("run folder %s; instrumentation %s (kernel backend %s); compute dtype %s; "
                     "attention %s", folder.path, config.instrument, backend,
                     compute_dtype(config), attention)
            end = config.train.steps if max_steps is None else min(config.train.steps,
                                                                  trainer.start + max_steps)
            trainer.run(end, progress=progress)
            trainer.say_if_auto_prune_never_fired()
    return folder.path


class ConfigChanged(ValueError):
    """The run folder holds a run of another configuration; the command adds what to do."""


def with_absolute_cache(config: Config) -> Config:
    """`data.cache` as an absolute path, so that config.json names the cache from any working
    directory."""
    if config.data.cache is None:
        return config
    cache = str(Path(config.data.cache).expanduser().absolute())
    return dataclasses.replace(config, data=dataclasses.replace(config.data, cache=cache))


def open_run_folder(run_dir: str | Path, config: Config, allow_config_change: bool,
                    writes: bool = True, corpus: dict | None = None) -> RunFolder:
    """The run folder, created; one that holds a run of another configuration is refused unless
    `allow_config_change`. `corpus`: the token cache's corpus record (runs/metadata.py); a run
    of the same corpus has the same cache, however its path is spelled. Without `writes`
    (processes other than 0), a view that writes nothing."""
    folder = RunFolder(run_dir) if writes else FollowerFolder(run_dir)
    folder.check_usable()
    saved = folder.read_config()
    # A folder that holds no run yet (an imported model before its first step) takes the new one.
    started = bool(folder.checkpoint_steps() or folder.read_metrics())
    if saved is not None and started and not allow_config_change:
        wanted = to_dict(config)
        old = with_defaults({k: saved.get(k) for k in wanted if k in saved})
        if corpus is not None and saved.get("corpus") == corpus and isinstance(
                old.get("data"), dict):
            old["data"] = {**old["data"], "cache": wanted["data"]["cache"]}
        differ = config_differences(old, wanted)
        if differ:
            raise ConfigChanged(f"{folder.path} holds a run with another configuration ("
                                + "; ".join(differ) + ")")
    folder.create()
    return folder


def with_defaults(saved: dict) -> dict:
    """A saved configuration with the fields it predates at their defaults: a run written by an
    earlier version ran at what its fields' defaults are now. Values that no longer parse are
    compared as they are (and differ)."""
    try:
        return to_dict(from_dict(saved))
    except (ValueError, TypeError):
        return saved


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'train.steps: 8 -> 12' for every field whose value differs."""
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


class Trainer:
    """One run's training state (parameters and optimizer, unit states, pruning) and the
    programs compiled for it."""

    def __init__(self, config: Config, folder: RunFolder, checkpoints: Checkpoints,
                 cache: TokenCache, parallel: Parallel,
                 profile_steps: tuple[int, int] | None = None):
        self.config, self.folder, self.cache, self.parallel = config, folder, cache, parallel
        self.checkpoints = checkpoints
        self.optimizer = make_optimizer(config)
        self.widths = model_config(config, cache.vocab_size).layer_widths()  # the original
        self.batch_size = config.train.batch_size * parallel.num_data  # the global batch
        self.rows = parallel.rows(self.batch_size)  # this process's rows of every batch
        if parallel.num_devices > 1:
            log.info("mesh data %d x model %d over %d processes: %d sequences per device "
                     "batch, %d per step", parallel.num_data, parallel.num_model,
                     parallel.num_processes, config.train.batch_size, self.batch_size)
        # Unit histories need the statistics: none with --instrument off.
        self.history_widths = self.widths if config.instrument != "off" else None
        self.state, self.unit_states, self.pruning = self._restore_or_init()
        self.start = int(parallel.fetch(self.state.step))
        self.program = None
        self.profile_steps = profile_steps  # (A, B): trace steps A .. B - 1
        self.traced: tuple[int, int] | None = None  # (first, last) step of the running trace
        self.units: dict = {}  # the unit histories at the last logged step, as host arrays

    # Setup ---------------------------------------------------------------------------------
    def _restore_or_init(self) -> tuple[Any, list[UnitStates], Pruning | None]:
        """The state of the newest readable checkpoint (a compacted one at its widths), or a
        fresh one; what was logged after it is dropped (the resume redoes it)."""
        try:
            latest = self.checkpoints.restore_latest(self.abstract_state)
        except NoReadableCheckpoint as err:
            raise ValueError(f"{err}; pass --start-over to discard its checkpoints, metrics and "
                             "masks and train from step 0") from None
        if latest is None:
            dropped = self.folder.drop_after(0)
            if dropped:
                log.warning("%s has no checkpoint: training from step 0 (dropped %d log lines)",
                            self.folder.path, dropped)
            model = Transformer(model_config(self.config, self.cache.vocab_size))
            state = init_state(model, self.optimizer, self.config, self.history_widths)
            if self.config.model.init_from:
                state = with_imported_params(state, self.optimizer, self.config.model.init_from)
                log.info("step 0 starts from the weights of %s", self.config.model.init_from)
            return self.parallel.state(state), [UnitStates(w) for w in self.widths], None
        step, state, meta = latest
        unit_states = [UnitStates.from_state_dict(w, meta["unit_states"][str(i)])
                       for i, w in enumerate(self.widths)]
        dropped = self.folder.drop_after(step)
        log.info("resumed from step %d (dropped %d log lines written after it)", step, dropped)
        return state, unit_states, saved_pruning(meta)

    def abstract_state(self, meta: dict):
        """The shapes, dtypes and placements of a checkpoint's state, from its meta: the
        configured widths, or the compacted ones after a compaction."""
        pruning = saved_pruning(meta)
        model = Transformer(model_config(self.config, self.cache.vocab_size, pruning=pruning))
        shapes = jax.eval_shape(lambda: init_state(model, self.optimizer, self.config,
                                                   self.history_widths))
        return self.parallel.abstract(shapes)

    def batch(self, step: int) -> jax.Array:
        """Step `step`'s global batch, placed on the devices: a function of the step alone, of
        which this process reads only its own rows."""
        t = self.config.train
        tokens = self.cache.batch("train", step, self.batch_size, self.config.model.seq_len,
                                  seed=t.seed, rows=self.rows)
        return self.parallel.place_rows(tokens, self.batch_size)

    def compile(self, tokens: jax.Array) -> None:
        start = time.perf_counter()
        # A profiled run's step is compiled so that its trace shows every kernel.
        options = NO_COMMAND_BUFFERS if self.profile_steps else None
        self.program = build_program(self.config, self.cache.vocab_size, self.optimizer,
                                     self.pruning, self.state, tokens, self.parallel.tracing,
                                     options)
        log.info("compiled the train step in %.1f s", time.perf_counter() - start)

    # The schedule --------------------------------------------------------------------------
    def prune_due(self, step: int) -> bool:
        """The fixed prune step (train.prune_at an int)."""
        t = self.config.train
        return t.prune != "none" and step == t.prune_at and self.pruning is None

    def auto_prune_due(self, step: int, units: dict) -> bool:
        """`train.prune_at=auto` at a logged step: the unused units are stable (history.py)."""
        t = self.config.train
        return (t.prune != "none" and t.prune_at == "auto" and self.pruning is None
                and bool(units) and auto_prune_ready(units, step, t.prune_window))

    def evaluated(self, step: int) -> bool:
        t = self.config.train
        return step % t.eval_every == 0 or step == t.steps - 1

    def logged(self, step: int) -> bool:
        """Logged steps: every log_every, the last, the prune step, and every evaluated step
        (so that no evaluation is lost)."""
        t = self.config.train
        return (step % t.log_every == 0 or step == t.steps - 1 or self.prune_due(step)
                or self.evaluated(step))

    def checkpoint_due(self, done: int, end: int) -> bool:
        return done % self.config.train.checkpoint_every == 0 or done == end

    def say_if_auto_prune_never_fired(self) -> None:
        t = self.config.train
        if t.prune != "none" and t.prune_at == "auto" and self.pruning is None:
            log.warning("--prune-at auto never fired: no logged step up to %d had units unused "
                        "for train.prune_window = %d steps with none coming back; the run "
                        "trained at its full width", int(self.parallel.fetch(self.state.step)) - 1,
                        t.prune_window)

    # The steps -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Eval loss and accuracy on the parameters the next forward pass sees."""
        t, m = self.config.train, self.config.model
        batches = self.cache.eval_batches(t.eval_batches, self.batch_size, m.seq_len)
        return evaluate(self.program.eval_step, self.state.params, batches,
                        place=self.parallel.place, fetch=self.parallel.fetch)

    def observe(self, step: int, scalars, stats, meter: "Throughput"
                ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The logged step's loss, learning rate, throughput and, with statistics, per-layer
        records, and its batch masks (per layer [num_data, W]: one per data-parallel batch,
        original unit ids). A step whose loss is not finite (train.on_nonfinite=skip) has no
        per-layer records: its statistics would read as units unused."""
        scalars, stats, units = self.parallel.fetch((scalars, stats, self.state.units))
        if int(scalars["first_nonfinite"]) >= 0:
            raise self.diverged(int(scalars["first_nonfinite"]), step)
        fields: dict[str, Any] = {"loss": float(scalars["loss"]),
                                  "grad_norm": float(scalars["grad_norm"]),
                                  "lr": learning_rate(self.config, step),
                                  "tokens_per_s": meter.rate(step + 1)}
        if "skipped" in scalars:
            fields["skipped_updates"] = int(scalars["skipped"])
            if bool(scalars["update_skipped"]):
                fields["update_skipped"] = True
        masks: list[np.ndarray] = []
        if stats and bool(scalars["loss_finite"]):
            ever_on = [u.first_on >= 0 for u in units]
            fields["layers"], masks = layer_records(stats, self.unit_states, self.pruning,
                                                    self.parallel.num_data, ever_on)
            self.folder.write_masks(step, masks)
        if units:
            self.units = to_arrays(units)
            self.folder.write_units(step, self.units)
        return fields, masks

    def diverged(self, first: int, step: int,
                 what: str = "its loss or gradient norm is not finite") -> Diverged:
        """Records the divergence in metrics.jsonl; the exception that ends the run."""
        kept = self.checkpoints.steps()
        last = kept[-1] if kept else None
        self.folder.append_metrics({"step": first, "diverged": {
            "detected_at": step, "on_nonfinite": self.config.train.on_nonfinite,
            "last_checkpoint": last}})
        where = (f"the last checkpoint, step {last}, holds finite values" if last is not None
                 else "no checkpoint was written")
        return Diverged(f"training diverged at step {first}: {what}; {where}. Lower "
                        "train.peak_lr, set train.clip_norm, or pass train.on_nonfinite=skip")

    def prune(self, step: int, masks: list[np.ndarray], tokens: jax.Array) -> dict[str, Any]:
        """From step + 1 on, only the units of `masks` remain (per layer [n, W] words in original
        ids: this step's batch masks, a unit used on any device kept; or with prune_at=auto the
        units used within the window); the program is rebuilt at the new widths. Returns the
        log entry."""
        t = self.config.train
        self.pruning = choose_units(t.prune, [np_or_rows(m) for m in masks], self.widths, step,
                                    t.seed, multiple=t.prune_multiple)
        entry = {"mode": self.pruning.mode, "kept": list(self.pruning.widths)}
        if self.pruning.mode == "compact":
            entry["padded"] = list(self.pruning.padded_widths)
            # Across processes the state is cut on the host, where every process holds it whole.
            state = self.state if self.parallel.num_processes == 1 else \
                self.parallel.fetch(self.state)
            self.state = self.parallel.state(compact_tree(state, self.pruning.keep,
                                                          self.pruning.padded_widths))
        self.compile(tokens)
        if self.traced is not None:  # the rebuilt step's kernels are not those of the traced HLO
            log.warning("the profile ends at the prune step %d; a new one, of the rebuilt "
                        "step, starts after it", step)
            self.end_profile()
        log.info("pruned (%s) after step %d: units per layer %s of %s%s", self.pruning.mode,
                 step, list(self.pruning.widths), list(self.widths),
                 f" (parameters padded to {entry['padded']})" if "padded" in entry else "")
        return entry

    def save(self, done: int) -> None:
        """A checkpoint of the state after `done` updates; a state that holds a non-finite
        value, or that followed a diverged step, is never written (Diverged instead)."""
        first, finite = self.parallel.fetch((self.state.first_nonfinite,
                                             all_finite(self.state)))
        if first >= 0:
            raise self.diverged(int(first), done - 1)
        if not finite:
            raise self.diverged(done - 1, done - 1, "its update left non-finite values in the "
                                "parameters or the optimizer state")
        self.checkpoints.save(done, self.state, {
            "unit_states": {str(i): u.state_dict() for i, u in enumerate(self.unit_states)},
            "pruning": self.pruning.state_dict() if self.pruning else {}})

    # The loop ------------------------------------------------------------------------------
    def run(self, end: int, *, progress: bool) -> None:
        """Steps start .. end - 1. Raises Diverged, or Interrupted after a stop request (Ctrl-C,
        SIGTERM) and its checkpoint."""
        if self.start >= end:
            log.info("the run is complete (%d steps)", self.start)
            return
        self.compile(self.batch(self.start))
        events = EventLog(self.folder.path, self.start) if self.parallel.is_primary else NoEvents()
        meter = Throughput(self.start, self.batch_size * self.config.model.seq_len)
        bar = tqdm(total=self.config.train.steps, initial=self.start,
                   disable=not (progress and self.parallel.is_primary),
                   unit="step", dynamic_ncols=True)
        try:
            with stop_requests() as stop:
                for step in range(self.start, end):
                    self.profile(step)
                    record = self.step(step, meter)
                    if record is not None:
                        events.write(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}",
                                        tok_s=f"{record['tokens_per_s']:.0f}")
                    bar.update(1)
                    stopping = self.stop_agreed(step, end, stop["stop"])
                    if self.checkpoint_due(step + 1, end) or stopping:
                        jax.block_until_ready(self.state)
                        with meter.paused():
                            self.save(step + 1)
                    if stopping:
                        raise Interrupted(f"stopped at step {step + 1} (checkpointed); run "
                                          "again with the same --run-dir to resume")
        finally:
            if self.traced is not None:
                self.end_profile()
            bar.close()
            events.close()

    def profile(self, step: int) -> None:
        """Starts the trace before step A (or the first step, on a resume inside A .. B) and
        stops it before step B, once the steps before have run."""
        if self.profile_steps is None:
            return
        first, stop = self.profile_steps
        if first <= step < stop:
            if self.traced is None:
                self.start_profile(step, stop)
                self.traced = (step, step)
            else:
                self.traced = (self.traced[0], step)
        elif self.traced is not None and step == stop:
            self.end_profile()

    def start_profile(self, step: int, stop: int) -> None:
        """The trace, and beside it the compiled step's HLO, which `relu-sparsity profile`
        attributes the trace's kernels by."""
        jax.block_until_ready(self.state)
        profile_dir = self.folder.path / "profile"
        if self.parallel.is_primary:
            profile_dir.mkdir(parents=True, exist_ok=True)
            (profile_dir / PROFILE_HLO_FILE).write_text(self.program.train_step.as_text())
        jax.profiler.start_trace(str(profile_dir))
        log.info("profiling steps %d-%d into %s", step, stop - 1, profile_dir)

    def end_profile(self) -> None:
        """Stops the trace and records the steps it holds (fewer than asked for where the run
        stopped or pruned inside them)."""
        jax.block_until_ready(self.state)
        jax.profiler.stop_trace()
        if self.parallel.is_primary:
            (self.folder.path / "profile" / PROFILE_STEPS_FILE).write_text(
                json.dumps({"first": self.traced[0], "stop": self.traced[1] + 1,
                            "command_buffers": "off"}) + "\n")
        self.traced = None

    def stop_agreed(self, step: int, end: int, requested: bool) -> bool:
        """Whether to stop after `step`. One process stops at once; several agree at logged and
        checkpoint steps (each process's request gathered), so that all stop at the same step."""
        if self.parallel.num_processes == 1:
            return requested
        if not (self.logged(step) or self.checkpoint_due(step + 1, end)):
            return False
        return self.parallel.any_process(requested)

    def step(self, step: int, meter: "Throughput") -> dict[str, Any] | None:
        """One training step; at a logged step, its record (also written to metrics.jsonl)."""
        tokens = self.batch(step)
        record: dict[str, Any] = {"step": step}
        if self.evaluated(step):
            jax.block_until_ready(self.state)  # the queued steps count as training
            with meter.paused():
                record.update(self.evaluate())
        self.state, scalars, stats = self.program.train_step(self.state, tokens)
        if not self.logged(step):
            return None
        fields, masks = self.observe(step, scalars, stats, meter)
        record.update(fields)
        if self.prune_due(step):
            if not masks:
                raise Diverged(f"step {step}, the prune step, has no batch mask: its loss was "
                               "not finite")
            record["pruned"] = self.prune(step, masks, tokens)
        elif self.auto_prune_due(step, self.units):
            window = self.config.train.prune_window
            used = [np_pack_bits(~dead)[None] for dead in dead_units(self.units, step, window)]
            record["pruned"] = self.prune(step, used, tokens)
            record["pruned"]["auto"] = {
                "window": window, "why": f"units unused for {window} steps and none came back "
                f"after {window} steps off within steps {step - window + 1}-{step}"}
            log.info("--prune-at auto fired at step %d: %s", step, record["pruned"]["auto"]["why"])
        self.folder.append_metrics(record)
        meter.restart(step + 1)
        return record


def check_profile_steps(steps: tuple[int, int] | None, total: int) -> None:
    if steps is not None and not 0 <= steps[0] < steps[1] <= total:
        raise ValueError(f"--profile-steps A:B needs 0 <= A < B <= train.steps = {total}, "
                         f"got {steps[0]}:{steps[1]}")


def saved_pruning(meta: dict) -> Pruning | None:
    return Pruning.from_state_dict(meta["pruning"]) if meta.get("pruning") else None


class NoEvents:
    """The event log of processes other than 0: process 0 writes the events."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Throughput:
    """Training tokens per second since the last logged step, with evaluation and checkpoint
    writing left out."""

    def __init__(self, step: int, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.restart(step)

    def restart(self, step: int) -> None:
        self.since_step, self.since_time = step, time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        self.since_time += time.perf_counter() - start

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self.since_time
        return (step - self.since_step) * self.tokens_per_step / elapsed


@contextlib.contextmanager
def stop_requests():
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and returns."""
    requested = {"stop": False}

    def handler(signum, frame):
        if requested["stop"]:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        requested["stop"] = True
        log.warning("stop requested: checkpointing after this step (press again to abort)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in old.items():
            signal.signal(s, h)
