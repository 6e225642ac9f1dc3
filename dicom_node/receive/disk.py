"""A full disk answered Out of Resources (A700): a free-space floor before each data set is
written, and a write that fails anyway turned into the same status instead of a dead association.

pynetdicom 3.0 (with ``STORE_RECV_CHUNKED_DATASET``) opens a ``NamedTemporaryFile`` in
``DIMSEMessage.decode_msg`` as soon as a C-STORE-RQ's command set is complete, and writes every
fragment of the data set to it from the association's reactor (DUL) thread, before any handler
runs. An ``OSError`` there (ENOSPC, EDQUOT, EIO) escapes into that thread, which dies: no
C-STORE-RSP is sent, the association hangs until the sender's own timeout, the traceback goes to
stderr, and the file stays in ``incoming/``. This module closes that hole for the receiver:

- :func:`install` replaces the ``NamedTemporaryFile`` name inside ``pynetdicom.dimse_messages``
  (and nowhere else) by :func:`open_dataset_file`, which returns a :class:`DatasetFile`;
- when the file system of ``incoming/`` has less than ``node.min_free_mb`` free (one
  ``os.statvfs`` per data set, ~1 µs: see docs/performance.md) no file is created: the data set's
  fragments are read off the network and dropped;
- a write or flush that fails closes and removes the file at once and drops the rest of the
  data set;
- either way the C-STORE handler asks :func:`written` first and answers
  ``StoreStatus.OUT_OF_RESOURCES``; the association stays usable for the next request.

:data:`guard` logs one ``disk_full`` warning when the first data set of an episode is refused and
one ``disk_space_recovered`` when a data set is next written whole, not one line per instance
(the refusals are counted, by status, in ``dicom_node_store_failures_total``).

The patch is process-wide and installed by the receiver only; ``tests/test_disk_full.py`` fails
if a pynetdicom upgrade changes the code it relies on (pynetdicom is pinned ``<4``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
import time
import uuid
from typing import Any

import pynetdicom.dimse_messages

from dicom_node.log import get_logger

log = get_logger()

MB = 1 << 20

#: pynetdicom.dimse_messages imports this name from tempfile, and calls it for each data set.
PATCHED_NAME = "NamedTemporaryFile"


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged process can still write on the file system holding ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


class DiskGuard:
    """The receiver's free-space floor and its disk-full episodes (one per process).

    An episode begins with the first data set refused (below the floor, or a failed write) and
    ends with the next data set written whole; it is logged once at each end."""

    def __init__(self) -> None:
        self.min_free_bytes = 0
        self._lock = threading.Lock()
        self._since: float | None = None
        self._refused = 0

    @property
    def full(self) -> bool:
        """Whether a disk-full episode is going on."""
        return self._since is not None

    def below_floor(self, folder: str) -> bool:
        """Whether ``folder``'s file system is below the floor (never, with the floor off);
        refuses the data set and may begin an episode when it is."""
        if self.min_free_bytes <= 0:
            return False
        try:
            free = free_bytes(folder)
        except OSError:
            return False  # cannot tell: let the write decide
        if free >= self.min_free_bytes:
            return False
        self.refused(folder, f"{free // MB} MiB free, below node.min_free_mb "
                     f"({self.min_free_bytes // MB} MiB)", free)
        return True

    def refused(self, folder: str, reason: str, free: int | None = None,
                error: OSError | None = None) -> None:
        """Count one refused data set; log ``disk_full`` if it begins an episode."""
        with self._lock:
            self._refused += 1
            if self._since is not None:
                return
            self._since = time.monotonic()
        if free is None:
            with contextlib.suppress(OSError):
                free = free_bytes(folder)
        fields: dict[str, Any] = {}
        if error is not None and error.errno is not None:
            fields["errno"] = errno.errorcode.get(error.errno, str(error.errno))
        log.warning("disk_full", reason=reason, path=folder,
                    free_mb=None if free is None else free // MB,
                    min_free_mb=self.min_free_bytes // MB,
                    action="answering C-STORE with Out of Resources (A700) until space is back",
                    **fields)

    def written(self, folder: str) -> None:
        """A data set was written whole: end the episode, if one is going on."""
        if self._since is None:  # unlocked read: the common case costs nothing
            return
        with self._lock:
            if self._since is None:
                return
            seconds, refused = time.monotonic() - self._since, self._refused
            self._since, self._refused = None, 0
        free = None
        with contextlib.suppress(OSError):
            free = free_bytes(folder) // MB
        log.info("disk_space_recovered", path=folder, free_mb=free,
                 min_free_mb=self.min_free_bytes // MB, refused=refused,
                 duration_seconds=round(seconds, 3))


#: The receiver process's guard; :func:`install` sets its floor.
guard = DiskGuard()


class DatasetFile:
    """Stands in for the ``NamedTemporaryFile`` pynetdicom writes one data set to.

    pynetdicom uses ``name``, ``write()``, ``file.flush()`` and ``close()``, then unlinks
    ``name`` (ignoring ``OSError``). Nothing here raises: a failure is kept in :attr:`failure`
    and the rest of the data set is dropped."""

    def __init__(self, folder: str, suffix: str) -> None:
        self.folder = folder
        #: Why the data set was not written (None while it is being written whole).
        self.failure: str | None = None
        self._file: Any = None
        self._path = ""
        if guard.below_floor(folder):
            self.failure = "below node.min_free_mb"
        else:
            try:
                self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in close())
                    delete=False, mode="wb", suffix=suffix, dir=folder)
                self._path = self._file.name
            except OSError as exc:
                self._fail(exc)

    @property
    def name(self) -> str:
        """The file's path; once the data set is dropped, a path that no file has: pynetdicom
        unlinks ``name`` after the handler (ignoring the error), and must not remove a file a
        later data set was given under the same random name."""
        if self.failure is None:
            return self._path
        return os.path.join(self.folder, f"unwritten-{uuid.uuid4().hex}.dcm")

    @property
    def file(self) -> DatasetFile:
        """pynetdicom flushes through ``.file`` after each fragment."""
        return self

    def write(self, data: bytes) -> int:
        if self._file is not None:
            try:
                return int(self._file.write(data))
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        """pynetdicom closes the file once the handler has run."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)
                return
            self._file = None
            guard.written(self.folder)

    def _fail(self, exc: OSError) -> None:
        """Close and remove the partial file now (its space is freed at once, and nothing is
        left behind if the sender gives up), and drop the rest of the data set."""
        self.failure = f"write failed: {exc.strerror or exc}"
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._file = None
        guard.refused(self.folder, self.failure, error=exc)


def open_dataset_file(*, delete: bool = False, mode: str = "wb", suffix: str = ".dcm",
                      dir: str | None = None, **_ignored: Any) -> DatasetFile:
    """Replaces ``NamedTemporaryFile`` in ``pynetdicom.dimse_messages`` (called there as
    ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``)."""
    del delete, mode  # always delete=False, "wb": what pynetdicom asks for
    return DatasetFile(dir if dir is not None else tempfile.gettempdir(), suffix)


def written(event: Any) -> bool:
    """Whether the EVT_C_STORE's data set is in its file, whole; False (and a debug line) when
    the floor or a failed write dropped it: answer ``StoreStatus.OUT_OF_RESOURCES``."""
    dataset_file = getattr(event.request, "_dataset_file", None)
    failure = getattr(dataset_file, "failure", None)
    if failure is None:
        return True
    log.debug("instance_not_stored", reason=f"disk full: {failure}",
              sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
              calling_ae=str(event.assoc.requestor.ae_title).strip())
    return False


def install(min_free_mb: int) -> None:
    """Route pynetdicom's data set files through :class:`DatasetFile`, with this floor (MB;
    0 turns the floor off, failed writes are still answered A700). Called again on reload."""
    guard.min_free_bytes = min_free_mb * MB
    setattr(pynetdicom.dimse_messages, PATCHED_NAME, open_dataset_file)


def uninstall() -> None:
    setattr(pynetdicom.dimse_messages, PATCHED_NAME, tempfile.NamedTemporaryFile)
