"""The DICOM validators tests check results with: dciodvfy (dicom3tools) and dsrdump (dcmtk).

Both are Debian packages (``apt-get install -y dicom3tools dcmtk``). A missing tool is an error,
not a skip: a test that silently skips its conformance check proves nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_TIMEOUT_S = 120


@dataclass(frozen=True)
class ToolReport:
    """What a validator said about one file."""

    returncode: int
    #: Lines that report an error ("Error - ..." from dciodvfy, "E: ..." from dcmtk).
    errors: tuple[str, ...]
    #: Lines that report a warning ("Warning - ..." from dciodvfy, "W: ..." from dcmtk).
    warnings: tuple[str, ...]
    #: stdout and stderr together.
    output: str


def dciodvfy(path: Path) -> ToolReport:
    """Check ``path`` against its IOD (PS3.3) with dciodvfy; a clean file has no error lines."""
    return _run(["dciodvfy", str(path)], error_prefix="Error", warning_prefix="Warning")


def dsrdump(path: Path) -> ToolReport:
    """Parse the SR content tree of ``path`` with dcmtk's dsrdump; exit status 0 when it could."""
    return _run(["dsrdump", str(path)], error_prefix="E:", warning_prefix="W:")


def _run(command: list[str], *, error_prefix: str, warning_prefix: str) -> ToolReport:
    if shutil.which(command[0]) is None:
        raise RuntimeError(
            f"{command[0]} is not installed; install it with "
            "`apt-get install -y dicom3tools dcmtk` (see the README's test command)"
        )
    completed = subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=_TIMEOUT_S, check=False
    )
    output = completed.stdout + completed.stderr
    lines = [line.strip() for line in output.splitlines()]
    return ToolReport(
        returncode=completed.returncode,
        errors=tuple(line for line in lines if line.startswith(error_prefix)),
        warnings=tuple(line for line in lines if line.startswith(warning_prefix)),
        output=output,
    )
