"""Reading a run folder's `config.json` and `metrics.jsonl`, with no JAX or Flax: reports and the
command line read runs on machines that only have the files."""

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
# Beside a profile's trace (RUN/profile/): the compiled step's HLO and the steps the trace holds.
PROFILE_HLO_FILE = "train_step.hlo.txt"
PROFILE_STEPS_FILE = "steps.json"


def read_metrics(run_dir: str | Path, *, missing_ok: bool = False) -> list[dict]:
    """The parsed lines of `run_dir/metrics.jsonl`, in file order.

    A run interrupted mid-write can leave a torn last line: it is skipped with a warning (a
    resume rewrites it). A bad line anywhere else means the file is corrupt: an error. A missing
    file is an error, or no records with `missing_ok`.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"no metrics file: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last:
                log.warning("%s: skipping truncated last line %d (%s)", path, i + 1, err)
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {i + 1} is not a JSON object")
        records.append(record)
    return records


def read_config(run_dir: str | Path) -> dict | None:
    """`run_dir/config.json` as written by training, or None when there is none. An unreadable
    one is an error: a resume must not guess what the run was."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config


def read_config_or_empty(run_dir: str | Path) -> dict:
    """`read_config` for reports: {} with a warning when config.json is missing or unreadable,
    so that a report still shows the metrics."""
    try:
        config = read_config(run_dir)
    except ValueError as err:
        log.warning("%s; the report ignores it", err)
        return {}
    if config is None:
        log.warning("%s is missing; the report uses the folder name and the metrics only",
                    Path(run_dir) / CONFIG_FILE)
        return {}
    return config


def read_units(run_dir: str | Path) -> dict | None:
    """`units.npz`, the unit histories at the last logged step (train/history.py): per layer I
    the arrays `first_on_I`, `last_on_I`, `on_steps_I`, `longest_off_I`, and `step`; None for
    a run without them."""
    import numpy as np

    path = Path(run_dir) / "units.npz"
    if not path.is_file():
        return None
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    layers = sorted({int(k.rsplit("_", 1)[1]) for k in arrays if k != "step"})
    return {"step": int(arrays["step"]),
            "layers": [{field: arrays[f"{field}_{i}"] for field in
                        ("first_on", "last_on", "on_steps", "longest_off")} for i in layers]}


def run_name(run_dir: str | Path, config: dict) -> str:
    """The run's configured name, else its folder's."""
    name = config.get("name")
    return str(name) if name else Path(run_dir).resolve().name


def config_value(config: dict, dotted: str, default=None):
    """config["train"]["mean_last"] for "train.mean_last"; `default` where any part is missing."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
