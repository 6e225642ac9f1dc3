"""Studies as files, and storescu sending them to an in-process receiver (tests shared by
retention, send slots and the PostgreSQL path)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.receive.scp import Receiver
from tests.conftest import sample_file


def study_files(folder: Path, name: str, count: int = 3) -> tuple[str, list[Path]]:
    """``count`` copies of a pydicom test image as one new study, written to ``folder``."""
    study = generate_uid()
    series = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = dcmread(sample_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"{study[-12:]}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def send_with_storescu(rx: Receiver, paths: list[Path]) -> None:
    """DCMTK's storescu sends ``paths`` to ``rx`` on one association (TCP_NODELAY=1)."""
    done = subprocess.run(
        ["storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(rx.port), *map(str, paths)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=60,
        check=False)
    assert done.returncode == 0, done.stderr
