"""Where a train step's device time goes: `train --profile-steps A:B`'s trace, each kernel put
in the model part and phase (forward, backward, update) its HLO instruction came from.

The trace (RUN/profile/plugins/profile/*/*.xplane.pb, read with jax.profiler.ProfileData) gives
each kernel's device time; the compiled step's HLO (RUN/profile/train_step.hlo.txt, written with
the trace) gives each instruction's `op_name`, the JAX name stack: `jvp(...)` is the forward,
`transpose(jvp(...))` the backward, and the Flax module path (`block_3/mlp`, `ln_final`, ...)
or the train step's own scopes (`loss`, `optimizer`, `unit_histories`) the part. xprof shows
the same trace op by op; this reduces it to the table that says which part to work on.

    relu-sparsity profile RUN_DIR [--top 15]
"""

import collections
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from relu_sparsity.runs.reader import PROFILE_HLO_FILE as HLO_FILE
from relu_sparsity.runs.reader import PROFILE_STEPS_FILE as STEPS_FILE

# Flax module (or train-step scope) in an op_name -> the part it belongs to.
PARTS = [
    (re.compile(r"block_\d+/attn(/|$)"), "attention"),
    (re.compile(r"block_\d+/mlp(/|$)"), "MLP"),
    (re.compile(r"block_\d+/ln_(attn|mlp)(/|$)|/ln_final(/|$)"), "layer norms"),
    (re.compile(r"embed\.attend|/unembed(/|$)"), "logits"),
    (re.compile(r"/embed(/|$)|pos_embed"), "embeddings"),
    (re.compile(r"[/(]loss[/)]|/loss$"), "loss"),
    (re.compile(r"/optimizer(/|$)"), "optimizer"),
    (re.compile(r"/unit_histories(/|$)"), "unit histories"),
    # An instruction named after the state's argument path acts on a parameter itself (a copy
    # or a cast of it to the compute dtype).
    (re.compile(r"^state\."), "parameter copies"),
]
HLO_OP_IN_ANNOTATION = re.compile(r"hlo_op=([^,#\s]+)")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name=\"([^\"]*)\"")


@dataclass
class Kernel:
    name: str  # the HLO instruction (or, unmatched, the kernel's own name)
    op_name: str  # its JAX name stack, "" if unknown
    total_ns: float = 0.0
    calls: int = 0


def phase_of(op_name: str) -> str:
    if not op_name:
        return "unknown"
    if "transpose(jvp" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "update"


def part_of(op_name: str) -> str:
    first = op_name.split(";")[0]  # a fusion of several ops names them all
    for pattern, part in PARTS:
        if pattern.search(first):
            return part
    return "other" if first else "unattributed"


def op_names(hlo_text: str) -> dict[str, str]:
    """Every HLO instruction's name -> its op_name; also under the name with '.' as '_', the
    form GPU kernels are named by."""
    names = {}
    for line in hlo_text.splitlines():
        match = INSTRUCTION.match(line)
        if match:
            name, op_name = match.groups()
            names[name] = op_name
            names.setdefault(name.replace(".", "_"), op_name)
    return names


def device_events(profile) -> list:
    """The kernels of the trace's accelerator planes (GPU streams, TPU "XLA Ops"); on a machine
    without one, the host's XLA thunks (events naming an hlo_op)."""
    devices = [p for p in profile.planes if p.name.startswith("/device:")]
    events = []
    for plane in devices:
        lines = [l for l in plane.lines if l.name.startswith("Stream") or l.name == "XLA Ops"]
        for line in lines or list(plane.lines):
            events += list(line.events)
    if events:
        return events
    host = [p for p in profile.planes if p.name == "/host:CPU"]
    return [e for p in host for l in p.lines for e in l.events if "hlo_op" in dict(e.stats)]


def instruction_of(event, names: dict[str, str]) -> str:
    """The HLO instruction an event ran: its hlo_op stat, an hlo_op in an annotation, or its
    own name if that is an instruction's; else the event's name."""
    stats = dict(event.stats)
    candidates = [stats.get("hlo_op")]
    for value in stats.values():
        if isinstance(value, str):
            candidates += HLO_OP_IN_ANNOTATION.findall(value)
    candidates.append(event.name)
    return next((c for c in candidates if c and c in names), stats.get("hlo_op") or event.name)


def kernels(trace: Path, hlo_text: str) -> tuple[list[Kernel], float]:
    """The trace's kernels by HLO instruction, most device time first, and the nanoseconds from
    the first kernel's start to the last one's end (the device's span, idle gaps included)."""
    from jax.profiler import ProfileData

    names = op_names(hlo_text)
    by_name: dict[str, Kernel] = {}
    with warnings.catch_warnings():  # jaxlib's event_stats type has no __module__
        warnings.simplefilter("ignore", DeprecationWarning)
        events = device_events(ProfileData.from_file(str(trace)))
        for event in events:
            name = instruction_of(event, names)
            kernel = by_name.setdefault(name, Kernel(name, names.get(name, "")))
            kernel.total_ns += event.duration_ns
            kernel.calls += 1
    span = max(e.end_ns for e in events) - min(e.start_ns for e in events) if events else 0.0
    return sorted(by_name.values(), key=lambda k: -k.total_ns), span


def summarize(kernel_list: list[Kernel], steps: int, span_ns: float) -> dict:
    """Milliseconds per step by part and phase, and the kernels that take the most; span:
    the device's time from the first kernel to the last, per step."""
    table = collections.defaultdict(lambda: collections.defaultdict(float))
    for k in kernel_list:
        table[part_of(k.op_name)][phase_of(k.op_name)] += k.total_ns / 1e6 / steps
    total = sum(sum(phases.values()) for phases in table.values())
    parts = {part: {**phases, "total": sum(phases.values())} for part, phases in table.items()}
    unattributed = parts.get("unattributed", {}).get("total", 0.0)
    return {"steps": steps, "device_ms_per_step": total,
            "attributed": 1.0 - unattributed / total if total else 0.0,
            "span_ms_per_step": span_ns / 1e6 / steps,
            "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1]["total"])),
            "kernels": [{"name": k.name, "part": part_of(k.op_name), "phase": phase_of(k.op_name),
                         "ms_per_step": k.total_ns / 1e6 / steps, "calls_per_step": k.calls / steps,
                         "op_name": k.op_name} for k in kernel_list]}


def newest_trace(profile_dir: Path) -> Path:
    traces = sorted(profile_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no trace in {profile_dir}: run `train --profile-steps A:B` first")
    return traces[-1]


def profile_run(run_dir: str | Path) -> dict:
    """The summary of RUN_DIR/profile's newest trace, also written to profile/summary.json."""
    profile_dir = Path(run_dir) / "profile"
    trace = newest_trace(profile_dir)
    hlo = profile_dir / HLO_FILE
    if not hlo.exists():
        raise FileNotFoundError(f"{hlo} is missing: the trace was not written by `train "
                                "--profile-steps`, so its kernels cannot be attributed")
    steps = json.loads((profile_dir / STEPS_FILE).read_text())
    kernel_list, span_ns = kernels(trace, hlo.read_text())
    summary = summarize(kernel_list, steps["stop"] - steps["first"], span_ns)
    summary["command_buffers"] = steps.get("command_buffers", "unknown")
    summary["trace"] = str(trace)
    (profile_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(summary: dict, top: int) -> str:
    phases = [p for p in ("forward", "backward", "update", "unknown")
              if any(p in row for row in summary["parts"].values())]
    buffers = {"off": "off (compiled without them: every kernel is seen)",
               "unknown": "not recorded"}.get(summary.get("command_buffers"), "on")
    lines = [f"device time per step: {summary['device_ms_per_step']:.2f} ms of kernels in a span "
             f"of {summary['span_ms_per_step']:.2f} ms (over {summary['steps']} steps); "
             f"{summary['attributed']:.1%} attributed to model parts; XLA command buffers "
             f"{buffers}",
             "| part | " + " | ".join(f"{p} ms" for p in phases) + " | total ms | share |",
             "| --- |" + " ---: |" * (len(phases) + 2)]
    for part, row in summary["parts"].items():
        share = row["total"] / summary["device_ms_per_step"] if summary["device_ms_per_step"] else 0
        lines.append(f"| {part} | " + " | ".join(f"{row.get(p, 0.0):.2f}" for p in phases)
                     + f" | {row['total']:.2f} | {share:.1%} |")
    lines += ["", f"top {top} kernels:", "| kernel | part | phase | ms/step | calls/step |",
              "| --- | --- | --- | ---: | ---: |"]
    for k in summary["kernels"][:top]:
        lines.append(f"| {k['name']} | {k['part']} | {k['phase']} | {k['ms_per_step']:.3f} | "
                     f"{k['calls_per_step']:g} |")
    return "\n".join(lines)
