"""Runs a folder of tests in a side environment (a Python with packages the main one goes
without) and asserts that they all passed."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_side_tests(python: Path, folder: Path, hint: str, env: dict | None = None) -> None:
    assert python.exists(), f"no side environment at {python}: {hint}"
    # --confcutdir: tests/conftest.py belongs to the JAX suite, not to the side environment.
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--confcutdir", str(folder), str(folder)],
                          cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary
