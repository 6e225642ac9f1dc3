"""Shared steps of the ``dicom-node evaluate`` tests: export a model's held-out set with its
train.py, and run the evaluate command in-process on it."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

from dicom_node.cli import main


def export_eval(model_dir: Path, folder: Path, limit: int, *extra: str) -> str:
    """``train.py --export-eval FOLDER --limit N``; its stdout (asserts it succeeded)."""
    done = subprocess.run(
        [sys.executable, str(model_dir / "train.py"), "--export-eval", str(folder),
         "--limit", str(limit), *extra], capture_output=True, text=True, timeout=120,
        check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_evaluate(model_dir: Path, data: Path, out: Path) -> tuple[int, str, str, Path]:
    """``dicom-node evaluate MODEL DATA --out OUT --check``: (exit code, stdout, stderr, OUT)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["evaluate", str(model_dir), str(data), "--out", str(out), "--check"])
    return code, stdout.getvalue(), stderr.getvalue(), out
