"""The `relu-sparsity` console script: parse, then call data/, train/, report/ or bench/."""

import argparse
import logging
import os
import sys
import threading
import traceback
from pathlib import Path

from relu_sparsity.kernels import BackendUnavailableError
from relu_sparsity.runs.reader import CONFIG_FILE, METRICS_FILE
from relu_sparsity.train.config import PRESETS, field_help

EPILOG_TRAIN = f"""\
overrides: any config field as section.key=value (JSON values), e.g.
  train.peak_lr=1e-3 train.steps=2000 model.d_ff=4096 'model.d_ff=[512,1024,1024,512]'
  data.source='["notes.txt", "src/"]' data.cache=/path/to/cache

fields (type, default of the base configuration; the presets set some of them, see
relu_sparsity/train/config.py):
{field_help()}

exit status: 0 finished, 2 refused before any work (bad input), 3 diverged (a non-finite loss
or gradient norm; every checkpoint kept holds finite values), 75 interrupted (Ctrl-C or SIGTERM,
checkpointed: run the same command again to resume)
"""


# The exit status of a command of which a part failed: a bench variant, or another process of a
# multi-process run (see EXIT_STATUS for the others).
EXIT_FAILED = 1


class PartFailed(Exception):
    """A part of the command failed; the rest was done and reported."""


def config_name(text: str) -> str:
    """A preset's name or a .json file's path (read later, with the overrides)."""
    if text not in PRESETS and not text.endswith(".json"):
        presets = ", ".join(sorted(PRESETS))
        raise argparse.ArgumentTypeError(f"{text!r} is neither a preset ({presets}) nor a "
                                         ".json file")
    return text


def step_range(text: str) -> tuple[int, int]:
    try:
        first, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (two step numbers), got {text!r}") from None
    return first, stop


def sweep_value(kind):
    """A sweep axis' value parser; an override caught by the axis' nargs="+" gets a hint."""
    def parse(text: str):
        if "=" in text:
            raise argparse.ArgumentTypeError(
                f"{text!r} is an override: put overrides before --lr / --d-ff / --layers")
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relu-sparsity", description=(
        "Watch and exploit activation sparsity in ReLU Transformers while they train."))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_prepare, _add_import, _add_export, _add_measure, _add_train,
                _add_experiment, _add_report, _add_bench, _add_tune, _add_profile):
        add(sub)
    return parser


def _add_prepare(sub) -> None:
    """`prepare`: a token cache from a corpus."""
    prep = sub.add_parser("prepare", help="build a token cache from a corpus")
    prep.add_argument("sources", nargs="*", help="text files or folders (.txt: a document per "
                      "paragraph; .jsonl: a document per line; .gz forms too; other files: a "
                      "document each); none and no --tfds: the default corpus (this Python's "
                      "standard-library sources)")
    prep.add_argument("--out", required=True, help="cache folder to write")
    prep.add_argument("--tfds", metavar="NAME[:VERSION]", help="a TFDS dataset already on disk "
                      "under --data-dir (e.g. c4/en:3.1.0), read through seqio, never downloaded "
                      "(needs the `seqio` extra)")
    prep.add_argument("--data-dir", help="the TFDS data directory of --tfds")
    prep.add_argument("--split", default="train", help="--tfds: the train split (default train)")
    prep.add_argument("--eval-split", default="validation",
                      help="--tfds: the eval split (default validation)")
    prep.add_argument("--text-key", default="text", help="the text field of TFDS examples and "
                      ".jsonl lines (default text)")
    prep.add_argument("--vocab", metavar="PATH.model", help="use this SentencePiece model (e.g. "
                      "T5's C4 vocabulary) instead of training one; --vocab-size is then its size")
    prep.add_argument("--hf-tokenizer", metavar="HF_DIR", help="encode with this Hugging Face "
                      "checkpoint's own tokenizer (its tokenizer.json), so that the cache holds "
                      "the tokens the checkpoint was trained on; the vocabulary is then the "
                      "model's")
    prep.add_argument("--vocab-size", type=int, default=4096,
                      help="pieces of the tokenizer trained on the corpus (default 4096)")
    prep.add_argument("--eval-fraction", type=float, default=0.02,
                      help="local corpora: the share of documents (by a hash of their names) in "
                      "the eval split (default 0.02)")
    prep.add_argument("--max-tokens", type=int, help="stop after about this many tokens (a "
                      "deterministic prefix of the corpus)")
    prep.add_argument("--tokenizer-sample-mb", type=float, default=100.0,
                      help="train the tokenizer on at most this many MB of the train split "
                      "(default 100)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_import(sub) -> None:
    """`import`: a run folder of a Hugging Face checkpoint."""
    imp = sub.add_parser("import", help="a run folder whose model is a Hugging Face checkpoint "
                         "(OPT, or a Llama-architecture model with a ReLU gate)")
    imp.add_argument("hf_dir", help="the checkpoint folder: config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="the run folder to create")
    imp.add_argument("--cache", required=True, help="a token cache in the checkpoint's own "
                     "tokens (`prepare --hf-tokenizer HF_DIR`)")
    imp.add_argument("--config", default="small", help="the preset (or JSON file) whose train "
                     "settings the run takes (default small)")
    imp.add_argument("overrides", nargs="*", help="section.key=value config overrides")


def _add_export(sub) -> None:
    """`export`: a run's model as a Hugging Face folder."""
    exp = sub.add_parser("export", help="a run's newest checkpoint as a Hugging Face folder "
                         "(OPT or Llama) that transformers loads (a pruned run at the units it "
                         "kept)")
    exp.add_argument("run_dir", help="the run folder")
    exp.add_argument("--out", required=True, help="the folder to write")


def _add_measure(sub) -> None:
    """`measure`: the statistics of a fixed model."""
    mea = sub.add_parser("measure", help="Tables 1-3 and the figures of a run's model as it is "
                         "(its newest checkpoint, or an imported run's weights), over eval "
                         "batches, with no training")
    mea.add_argument("run_dir", help="the run folder")
    mea.add_argument("--cache", required=True, help="token cache (its eval split is read)")
    mea.add_argument("--batches", type=int, default=16, help="eval batches (default 16)")
    mea.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's)")
    mea.add_argument("--instrument", choices=("xla", "fused"), help="default: the fused kernel "
                     "where one runs here, else the reference statistics (xla)")
    mea.add_argument("--out", help="the folder of the measurement (default RUN/measure)")
    mea.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_train(sub) -> None:
    """`train`: one run."""
    train = sub.add_parser("train", help="train a ReLU Transformer and log its sparsity",
                           epilog=EPILOG_TRAIN, formatter_class=argparse.RawTextHelpFormatter)
    train.add_argument("--config", default="tiny", type=config_name, metavar="PRESET|FILE.json",
                       help=f"preset ({', '.join(sorted(PRESETS))}; default: tiny, a few minutes "
                       "on a CPU) or a JSON file of config fields, e.g. a run's config.json")
    train.add_argument("--run-dir", help="run folder (default: the folder of --config "
                       "RUN/config.json, else runs/<the config's name>); an existing one is "
                       "resumed")
    train.add_argument("--cache", help="token cache folder from `prepare` (default: the "
                       "default corpus, prepared on first use)")
    train.add_argument("--instrument", choices=("fused", "xla", "off"),
                       help="where the sparsity statistics come from (default: xla)")
    train.add_argument("--kernel", help="kernel backend for --instrument fused: auto, "
                       "triton, mosaic_gpu, pallas_tpu")
    train.add_argument("--prune", choices=("mask", "compact", "random"),
                       help="after --prune-at's batch, drop the units it did not use: mask "
                       "(zero them, same shapes), compact (remove them from weights and optimizer "
                       "state), random (the control: as many units, chosen at random)")
    train.add_argument("--prune-at", help="the step whose batch mask decides, or auto: once the "
                       "units unused for train.prune_window steps stay unused (none comes back)")
    train.add_argument("--widths-from", metavar="RUN", help="per-layer MLP widths = the units "
                       "RUN used per batch at its end (the paper's Round 2)")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume a run folder although its config differs")
    train.add_argument("--start-over", action="store_true",
                       help="discard the run folder's checkpoints, metrics and masks and train "
                       "from step 0")
    train.add_argument("--no-report", action="store_true", help="skip tables and plots")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--profile-steps", metavar="A:B", type=step_range,
                       help="record a jax.profiler trace of steps A .. B-1 in RUN_DIR/profile "
                       "(open with TensorBoard's profile plugin or ui.perfetto.dev)")
    _add_processes(train)
    train.add_argument("overrides", nargs="*", help="section.key=value config overrides")


def _add_processes(parser) -> None:
    """jax.distributed.initialize's arguments: the same command runs on every host."""
    group = parser.add_argument_group(
        "several processes (hosts)", "one process per host, the same command on each; without "
        "these flags JAX detects SLURM, TPU pods, Kubernetes and Open MPI by itself")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address, reachable by every process")
    group.add_argument("--num-processes", type=int, help="number of processes")
    group.add_argument("--process-id", type=int, help="this process's index, 0 .. N - 1")
    group.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                       help="a process silent for S seconds is declared dead and the others "
                       "stop (default: 100)")


def _add_experiment(sub) -> None:
    """`experiment`: the paper's experiments."""
    exp = sub.add_parser("experiment", help="the paper's pruning experiments",
                         epilog=EPILOG_TRAIN, formatter_class=argparse.RawTextHelpFormatter)
    exp.add_argument("which", choices=("masking", "capacity", "sweep"),
                     help="masking: baseline / mask / compact / random after --prune-at; "
                     "capacity: round 1, then round 2 at round 1's used widths (Table 4); "
                     "sweep: a run per point of --lr / --d-ff / --layers (Table 5, Figures 3 "
                     "and 4)")
    exp.add_argument("--lr", nargs="+", type=sweep_value(float), help="sweep: peak learning rates")
    exp.add_argument("--d-ff", nargs="+", type=sweep_value(int), help="sweep: MLP widths")
    exp.add_argument("--layers", nargs="+", type=sweep_value(int),
                     help="sweep: numbers of layers")
    exp.add_argument("--config", default="tiny", type=config_name, metavar="PRESET|FILE.json",
                     help=f"preset ({', '.join(sorted(PRESETS))}) or a JSON file of config "
                     "fields")
    exp.add_argument("--out", required=True, help="folder for the runs and the comparison")
    exp.add_argument("--prune-at", type=int, help="masking: the step whose batch mask decides "
                     "(default: a third of the steps)")
    exp.add_argument("--cache", help="token cache folder from `prepare`")
    exp.add_argument("--instrument", choices=("fused", "xla"),
                     help="where the sparsity statistics come from (default: xla)")
    exp.add_argument("--kernel", help="kernel backend for --instrument fused")
    exp.add_argument("--no-progress", action="store_true", help="no progress bars")
    exp.add_argument("overrides", nargs="*", help="section.key=value config overrides")


def _add_report(sub) -> None:
    """`report`: tables and figures from run folders."""
    report = sub.add_parser("report", help="the paper's tables and figures from runs")
    report.add_argument("runs", nargs="+", help="run folders")
    report.add_argument("--out", help="output folder (default: the run folder, for one run)")
    report.add_argument("--last-k", type=int, default=None,
                        help="average the tables over the last K logged steps (default: the "
                        "runs' train.mean_last, else 5)")
    report.add_argument("--paper", action="store_true", help="each run's Tables 1, 2, 3 and 5 "
                        "beside the paper's own numbers")


def _add_tune(sub) -> None:
    """`tune`: tile configurations searched on the device."""
    tune = sub.add_parser("tune", help="search a fused kernel's tile configurations at these "
                          "shapes on this device (each checked exact, then timed) and write the "
                          "fastest to its configuration file")
    tune.add_argument("--backend", default="mosaic_gpu", help="mosaic_gpu, triton or pallas_tpu")
    tune.add_argument("--shapes", nargs="+", default=[], help="TxDxF shapes")
    tune.add_argument("--presets", nargs="+", default=[], metavar="PRESET",
                      help="also every shape these presets' runs give the kernel: the train "
                      "batch at full width and at the widths compaction leaves (25/50/70/90%% "
                      "of the units kept, rounded up to train.prune_multiple)")
    tune.add_argument("--dtype", default="bfloat16")
    tune.add_argument("--seq-len", type=int, default=None,
                      help="tokens per sequence (default: 512, or the largest divisor of T)")
    tune.add_argument("--candidates", type=int, default=24,
                      help="configurations tried per shape, the configured one first (default 24)")
    tune.add_argument("--repeats", type=int, default=5, help="timed rounds per candidate")
    tune.add_argument("--out", help="configuration file to update (default: the package's "
                      "kernels/configs/<backend>.json)")
    tune.add_argument("--report", help="also write every candidate's result as JSON here, "
                      "shape by shape")
    tune.add_argument("--resume", action="store_true",
                      help="skip the shapes the --report file already holds")
    tune.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                      help="start no shape after this long; the rest are listed (--resume "
                      "tunes them later)")


def _add_profile(sub) -> None:
    """`profile`: where a profiled train step's device time goes."""
    profile = sub.add_parser("profile", help="the device time per step of a run's profiled "
                             "steps (train --profile-steps), by model part and phase")
    profile.add_argument("run_dir", help="the run folder")
    profile.add_argument("--top", type=int, default=15, help="kernels listed (default 15)")


def _add_bench(sub) -> None:
    """`bench`: kernel and train-step benchmarks."""
    bench = sub.add_parser("bench", help="kernel benchmarks against XLA")
    bench.add_argument("--shapes", nargs="+", default=None,
                       help="TxDxF shapes (default: the three paper-scale shapes on an "
                       "accelerator, small ones on a CPU)")
    bench.add_argument("--seq-len", type=int, default=None,
                       help="tokens per sequence, which must divide each shape's T (default: "
                       "512, or the largest divisor of T below it)")
    bench.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bfloat16 on "
                       "an accelerator, float32 on a CPU)")
    bench.add_argument("--repeats", type=int, default=5,
                       help="timed rounds per variant; the median is reported (default 5)")
    bench.add_argument("--out", help="also write the table as JSON here")
    bench.add_argument("--presets", nargs="+", default=[], metavar="PRESET",
                       help="also every shape these presets' runs give the kernel (as tune "
                       "--presets lists them)")
    bench.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                       help="time only these of the reference and the compiled fused backends "
                       "(default: all), each against XLA's dot+bias+ReLU")
    bench.add_argument("--train-step", metavar="CONFIG", help="time the train step of this "
                       "preset (e.g. paper) instead of the kernels, each instrument mode in its "
                       "own process, with its peak device memory")
    bench.add_argument("--instruments", nargs="+", default=["off", "xla", "fused"],
                       help="modes for --train-step (default: off xla fused)")
    bench.add_argument("--baseline", choices=("flax", "none"), default="none",
                       help="for --train-step: also time the plain Flax/optax model of the same "
                       "shape (what a user would write by hand), and give every row's ratio "
                       "to it")
    bench.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="config overrides for --train-step")
    bench.add_argument("--prune", nargs="+", default=["none"],
                       choices=("none", "mask", "compact"),
                       help="for --train-step: also time the step after pruning, with the units "
                       "kept as live columns (mask) or removed (compact)")
    bench.add_argument("--history", nargs="+", default=["on"], choices=("on", "off"),
                       help="for --train-step: with the unit histories updated every step "
                       "(on, as training does), without (off), or both to compare")
    bench.add_argument("--profile", metavar="DIR", help="for --train-step: also trace a few "
                       "steps of each variant into DIR/<instrument>-<prune>, which `relu-sparsity "
                       "profile DIR/<instrument>-<prune>` reads")
    bench.add_argument("--keep-fraction", type=float, default=0.7,
                       help="for --prune: the fraction of each layer's units that remain, chosen "
                       "at random (default 0.7: 30%% removed)")

def cmd_prepare(args) -> None:
    from relu_sparsity import data

    if args.tfds:
        if args.sources:
            raise ValueError("give text files or --tfds, not both")
        if not args.data_dir:
            raise ValueError("--tfds needs --data-dir, the TFDS data directory that holds it")
        from relu_sparsity.data.tfds import TfdsSource

        source = TfdsSource(args.tfds, args.data_dir, text_key=args.text_key, split=args.split,
                            eval_split=args.eval_split)
    else:
        source = [str(Path(s)) for s in args.sources] if args.sources else data.DEFAULT_CORPUS
    path = data.prepare(args.out, source, vocab_size=args.vocab_size,
                        eval_fraction=args.eval_fraction, vocab=args.vocab,
                        max_tokens=args.max_tokens, text_key=args.text_key,
                        tokenizer_sample_chars=int(args.tokenizer_sample_mb * 1e6),
                        progress=not args.no_progress, hf_tokenizer=args.hf_tokenizer)
    print(f"token cache ready: {path}")


def cmd_import(args) -> None:
    from relu_sparsity.runs.folder import RunFolder, check_writable_folder
    from relu_sparsity.train import config as config_lib
    from relu_sparsity.train.imported import imported_config

    out = Path(args.out)
    check_writable_folder(out, "run folder")
    if (out / CONFIG_FILE).exists():
        raise ValueError(f"{out} already holds a run; choose another --out")
    config = config_lib.apply_overrides(
        imported_config(args.hf_dir, args.cache, config_lib.load(args.config)), args.overrides)
    config_lib.validate(config)
    folder = RunFolder(out)
    folder.create()  # its checkpoints/ folder marks it as a run's for `train --config`
    folder.write_config(config_lib.to_dict(config))
    m = config.model
    print(f"imported {args.hf_dir}: {m.num_layers} layers, d_model {m.d_model}, d_ff {m.d_ff}, "
          f"{m.mlp} MLP, vocabulary {config.data.vocab_size}\nrun folder: {out}\ntrain it "
          f"with: relu-sparsity train --config {out / CONFIG_FILE} [--instrument fused] "
          "[--prune compact --prune-at N]")


def cmd_export(args) -> None:
    import shutil

    from relu_sparsity.model.hf import SPECIAL_TOKEN_IDS, export_family, read_hf_config, save_hf
    from relu_sparsity.runs.folder import check_writable_folder
    from relu_sparsity.train.imported import TOKENIZER_FILES, trained_model

    out = Path(args.out)
    check_writable_folder(out, "export folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose another --out")
    run_config, cfg, params, step = trained_model(args.run_dir)
    family = export_family(cfg)
    init_from = Path(run_config.model.init_from) if run_config.model.init_from else None
    source = read_hf_config(init_from) if init_from and init_from.is_dir() else {}
    save_hf(cfg, params, out, extra={k: source[k] for k in SPECIAL_TOKEN_IDS if k in source})
    copied = [name for name in TOKENIZER_FILES if init_from and (init_from / name).is_file()]
    for name in copied:  # the imported checkpoint's tokenizer goes with its model
        shutil.copy(init_from / name, out / name)
    print(f"exported step {step} of {args.run_dir} to {out}: {family}, {cfg.num_layers} layers, "
          f"per-layer widths {list(cfg.layer_widths())} zero-padded to "
          f"{max(cfg.layer_widths())}" + (f"; with {', '.join(copied)}" if copied else ""))


def cmd_measure(args) -> None:
    from relu_sparsity.report import write_report
    from relu_sparsity.runs.folder import check_writable_folder
    from relu_sparsity.train.measure import measure

    out = Path(args.out) if args.out else Path(args.run_dir) / "measure"
    check_writable_folder(out, "measure folder")
    if (out / METRICS_FILE).exists():
        raise ValueError(f"{out} holds a measurement already; choose another --out")
    if not (Path(args.run_dir) / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{args.run_dir} is not a run folder (no {CONFIG_FILE})")
    measure(args.run_dir, args.cache, out, args.batches, instrument=args.instrument,
            batch_size=args.batch_size, progress=not args.no_progress)
    tables = write_report([out], last_k=args.batches)
    print(f"\nmeasured {args.run_dir} over {args.batches} batches\ntables: {tables}\nplots: "
          f"{out / 'plots'}\n")
    print(Path(tables).read_text())


def common_overrides(args) -> list[str]:
    """The flags that are shorthands for config fields, as overrides."""
    import json

    overrides = list(args.overrides)
    if args.instrument:
        overrides.append(f"instrument={args.instrument}")
    if args.kernel:
        overrides.append(f"kernel={args.kernel}")
    if args.cache:
        overrides.append(f"data.cache={json.dumps(args.cache)}")
    return overrides


def cmd_train(args) -> None:
    import json

    from relu_sparsity.report import used_units, write_report
    from relu_sparsity.runs.reader import read_metrics
    from relu_sparsity.train import config as config_lib
    import jax

    from relu_sparsity.train.parallel import start_processes
    from relu_sparsity.train.trainer import ConfigChanged, train

    overrides = common_overrides(args)
    if args.prune:
        overrides.append(f"train.prune={args.prune}")
    if args.prune_at is not None:
        overrides.append(f"train.prune_at={args.prune_at}")  # an int, or the string auto
    if args.widths_from:
        last_k = config_lib.load(args.config).train.mean_last
        used = [max(1, round(u)) for u in used_units(read_metrics(args.widths_from), last_k)]
        if not used:
            raise ValueError(f"{args.widths_from} logged no per-layer metrics")
        overrides.append(f"model.d_ff={json.dumps(used)}")
        print(f"--widths-from {args.widths_from}: per-layer d_ff {used} (units it used per "
              "batch over its last logged steps, after its prune step if it pruned)")
    config = config_lib.load(args.config, overrides)
    if args.prune_at is not None and config.train.prune == "none":
        raise ValueError("--prune-at chooses the step of --prune mask|compact|random; without "
                         "--prune it would be ignored")
    run_dir = Path(args.run_dir or run_folder_of(args.config) or Path("runs") / config.name)
    start_processes(args.coordinator_address, args.num_processes, args.process_id,
                    args.heartbeat_timeout, on_lost_peer=args.on_lost_peer)
    try:
        train(config, run_dir, allow_config_change=args.allow_config_change,
              progress=not args.no_progress, start_over=args.start_over,
              profile_steps=args.profile_steps)
    except ConfigChanged as err:
        raise ValueError(f"{err}; pass --allow-config-change to resume it with this one, or "
                         "choose another --run-dir") from None
    if not args.no_report and jax.process_index() == 0:
        tables = write_report([run_dir], last_k=config.train.mean_last)
        print(f"\nrun folder: {run_dir}\ntables: {tables}\nplots: {run_dir / 'plots'}\n")
        print(Path(tables).read_text())


def run_folder_of(config_file: str) -> Path | None:
    """The run folder whose config.json `--config` names (a later `train` resumes it), or
    None for a preset or another JSON file."""
    path = Path(config_file)
    if path.name == CONFIG_FILE and ((path.parent / METRICS_FILE).is_file()
                                     or (path.parent / "checkpoints").is_dir()):
        return path.parent
    return None


def cmd_experiment(args) -> None:
    from relu_sparsity.runs.folder import check_writable_folder
    from relu_sparsity.train import config as config_lib
    from relu_sparsity.train import experiments
    from relu_sparsity.train.trainer import ConfigChanged

    config = config_lib.load(args.config, common_overrides(args))
    check_writable_folder(args.out, "--out")
    try:
        run_experiment(args, config, experiments)
    except ConfigChanged as err:
        raise ValueError(f"{err}; an experiment resumes only the runs of its own "
                         "configuration: choose another --out, or delete that run folder to "
                         "train it again") from None


def run_experiment(args, config, experiments) -> None:
    if args.which == "masking":
        prune_at = args.prune_at if args.prune_at is not None else config.train.steps // 3
        table = experiments.masking_experiment(config, args.out, prune_at,
                                               progress=not args.no_progress)
    elif args.which == "sweep":
        from relu_sparsity.train.sweep import run_sweep

        table = run_sweep(config, args.out, {"lr": args.lr, "d_ff": args.d_ff,
                                             "layers": args.layers},
                          progress=not args.no_progress)
    else:
        table = experiments.capacity_experiment(config, args.out, progress=not args.no_progress)
    print(Path(table).read_text())
    print(f"comparison: {table}; tables and plots: {Path(args.out) / 'tables.md'}")
    if args.which == "sweep":
        from relu_sparsity.train.sweep import diverged_points
        from relu_sparsity.train.trainer import Diverged

        diverged = diverged_points(args.out, {"lr": args.lr, "d_ff": args.d_ff,
                                              "layers": args.layers})
        if diverged:
            raise Diverged(f"{len(diverged)} sweep point(s) diverged: {', '.join(diverged)}; "
                           "the others finished")


def cmd_report(args) -> None:
    from relu_sparsity.report import write_report
    from relu_sparsity.runs.folder import check_writable_folder
    from relu_sparsity.runs.reader import config_value, read_config_or_empty

    for run in args.runs:
        if not Path(run).is_dir():
            raise ValueError(f"{run} is not a run folder")
    check_writable_folder(args.out or args.runs[0], "--out")
    last_k = args.last_k
    if last_k is None:
        ks = [config_value(read_config_or_empty(r), "train.mean_last") for r in args.runs]
        last_k = min((k for k in ks if k), default=5)
    tables = write_report(args.runs, args.out, last_k=last_k, paper=args.paper)
    print(Path(tables).read_text())
    print(f"tables: {tables}")


def cmd_tune(args) -> None:
    from relu_sparsity.bench.kernels import requested_shapes
    from relu_sparsity.bench.tune import main as tune_main

    shapes = requested_shapes(args.shapes, args.presets)
    if not shapes:
        raise ValueError("tune: give --shapes, --presets or both")
    result = tune_main(args.backend, shapes, dtype=args.dtype, seq_len=args.seq_len,
                       limit=args.candidates, repeats=args.repeats, out=args.out,
                       report=args.report, resume=args.resume, time_limit=args.time_limit)
    failed = [shape for shape, rows in result["rows"].items()
              if not any("ms" in row for row in rows)]
    if failed:
        raise PartFailed(f"no candidate passed at {', '.join(failed)}: their configurations "
                         "are unchanged (the log says why each failed)")
    if result.get("not_tuned"):
        raise PartFailed(f"time limit reached; not tuned: {' '.join(result['not_tuned'])} "
                         "(tune again with --resume)")


def cmd_profile(args) -> None:
    from relu_sparsity.bench import step_profile

    summary = step_profile.profile_run(args.run_dir)
    print(step_profile.format_summary(summary, args.top))
    print(f"summary: {Path(args.run_dir) / 'profile' / 'summary.json'}")


def cmd_bench(args) -> None:
    if args.train_step:
        import json

        from relu_sparsity.bench import train_step
        from relu_sparsity.train.config import preset

        for instrument in args.instruments:  # a bad preset or override: refused before any run
            preset(args.train_step, [f"instrument={instrument}", *args.set])
        rows = train_step.run_isolated(args.train_step, args.instruments, args.set,
                                       rounds=args.repeats, prunes=tuple(args.prune),
                                       keep_fraction=args.keep_fraction,
                                       histories=tuple(h == "on" for h in args.history),
                                       baseline=args.baseline == "flax",
                                       profile_dir=args.profile)
        print(train_step.format_table(rows))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
        failed = [f"{r['instrument']} (prune {r['prune']})" for r in rows if "error" in r]
        if failed:
            raise PartFailed(f"{len(failed)} of {len(rows)} train-step variants failed: "
                             f"{', '.join(failed)}; the table shows each error")
        return
    from relu_sparsity.bench.kernels import main as bench_main, requested_shapes

    shapes = requested_shapes(args.shapes, args.presets)
    rows = bench_main(shapes=shapes or None, seq_len=args.seq_len, dtype=args.dtype,
                      repeats=args.repeats, out=args.out, backends=args.backends)
    failed = [f"{r['variant']} at {r['shape']}" for r in rows if "error" in r]
    if failed:
        raise PartFailed(f"{len(failed)} variant(s) failed the exactness check and were not "
                         f"timed: {', '.join(failed)}; the table shows each error")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # Overrides may follow options (`experiment masking --out d model.d_ff=64`), which argparse
    # leaves unparsed after a first positional: collect them here.
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    return args


# Words of the runtime's errors when a collective or the coordination service loses a peer.
PEER_LOST = ("Connection reset", "Connection closed", "heartbeat", "UNAVAILABLE", "Gloo",
             "NCCL", "barrier", "Barrier")


def multi_process_error(err: Exception) -> bool:
    """A runtime error of a multi-process run, or one that says a peer is gone (a collective
    of gloo raises ValueError)."""
    jax = sys.modules.get("jax")
    return (jax is not None and jax.process_count() > 1
            and (isinstance(err, jax.errors.JaxRuntimeError) or lost_a_peer(err)))


def lost_a_peer(err: Exception) -> bool:
    return any(word in str(err) for word in PEER_LOST)


_stopping = threading.Lock()


def stop_process(command: str, what: str) -> None:
    """Ends a process of a multi-process run with one line, its locks released. It skips
    Python's exit, whose jax.distributed shutdown would wait for the processes that are gone.
    Called from the main thread or the peer watch, whichever comes first; the other blocks."""
    from relu_sparsity.runs import lock

    with _stopping:  # released only where os._exit returns (a test's stand-in)
        print(f"relu-sparsity {command}: stopped: {what}; start every process again to resume "
              "from the last checkpoint", file=sys.stderr)
        lock.release_all()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILED)


def exit_status(command: str, err: Exception) -> int:
    """The exit status of a command that raised `err`, after its one line; other errors
    propagate with their traceback."""
    from relu_sparsity.train.trainer import EXIT_STATUS, TrainingStopped

    if isinstance(err, (ValueError, FileNotFoundError, BackendUnavailableError)):
        print(f"relu-sparsity {command}: error: {err}", file=sys.stderr)
        return EXIT_STATUS["refused"]
    if isinstance(err, PartFailed):
        print(f"relu-sparsity {command}: failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(err, TrainingStopped):
        print(f"relu-sparsity {command}: {err.status}: {err}", file=sys.stderr)
        return EXIT_STATUS[err.status]
    raise err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("jax").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's notes on every save
    from relu_sparsity.train import peers
    from relu_sparsity.train.trainer import EXIT_STATUS

    args.on_lost_peer = lambda what: stop_process(
        args.command, f"another process of the run is gone ({what})")
    try:
        {"prepare": cmd_prepare, "import": cmd_import, "export": cmd_export,
         "measure": cmd_measure, "train": cmd_train,
         "experiment": cmd_experiment,
         "report": cmd_report, "bench": cmd_bench, "tune": cmd_tune,
         "profile": cmd_profile}[args.command](args)
    except Exception as err:
        if multi_process_error(err):
            if not lost_a_peer(err):  # a failure of this process: its traceback helps
                traceback.print_exc()
            what = "another process of the run is gone" if lost_a_peer(err) else "it failed"
            stop_process(args.command, f"{what} ({peers.first_line(err)})")
        status = exit_status(args.command, err)
    else:
        status = EXIT_STATUS["finished"]
    peers.leave_together(peers.REFUSED_WAIT_S if status == EXIT_STATUS["refused"]
                         else peers.EXIT_BARRIER_TIMEOUT_S)
    return status


if __name__ == "__main__":
    sys.exit(main())
