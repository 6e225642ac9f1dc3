"""Processes that open one database at the same moment, the way receivers and workers of the
scale-out path start together: the migration tests run them on SQLite and on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: The repository root: the children run there, so that they import this checkout's dicom_node.
ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import pathlib, sys, time
from dicom_node.store.db import make_engine
go = pathlib.Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
make_engine(sys.argv[1]).dispose()
print("done", flush=True)
"""


def open_together(url: str, go: Path, count: int = 4
                  ) -> tuple[list[subprocess.Popen[str]], list[str]]:
    """``count`` processes that open ``url`` with make_engine at the same moment (each has
    imported everything and waits for the file ``go``); their outputs once they have ended."""
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, url, str(go)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(count)]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        go.touch()
        outputs = [child.communicate(timeout=120)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    return children, outputs
