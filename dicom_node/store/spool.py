"""The spool: DICOM files on disk, named from validated UIDs only.

Layout: ``<data_dir>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Every
component is checked against the UID grammar before it becomes part of a path, so no tag text can
point outside the spool. A file is written to ``<data_dir>/incoming`` (same file system), fsync'd,
renamed into place atomically, and the folder entry fsync'd — after :func:`commit_file` returns the
file survives a crash or a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path

from dicom_node.uids import validate_uid


def instance_path(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance lives in the spool; raises InvalidUIDError for a bad UID."""
    return (
        spool_dir
        / validate_uid(study_uid, "Study Instance UID")
        / validate_uid(series_uid, "Series Instance UID")
        / f"{validate_uid(sop_uid, 'SOP Instance UID')}.dcm"
    )


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data to the disk (the file may have been written through another handle)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """mkdir -p that fsyncs each parent whose entries it changed."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        fsync_dir(folder.parent)


def commit_file(temp_path: Path, final_path: Path, *, replace: bool = True,
                synced: bool = False) -> bool:
    """Durably move ``temp_path`` (same file system) to ``final_path``.

    ``synced``: the caller already fsync'd ``temp_path``. Returns False (and removes the temporary
    file) when ``final_path`` exists and ``replace`` is False — the first copy is kept.
    """
    if not synced:
        fsync_file(temp_path)
    _make_dirs(final_path.parent)
    if not replace and final_path.exists():
        temp_path.unlink(missing_ok=True)
        return False
    os.replace(temp_path, final_path)
    fsync_dir(final_path.parent)
    return True


def write_file(data: bytes, final_path: Path, scratch_dir: Path) -> None:
    """Write bytes durably to ``final_path`` via a temporary file in ``scratch_dir``."""
    scratch_dir.mkdir(parents=True, exist_ok=True)
    temp = scratch_dir / f".{final_path.name}.{os.getpid()}.tmp"
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
    commit_file(temp, final_path)
