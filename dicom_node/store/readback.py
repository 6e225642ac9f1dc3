"""Reading stored instances back, defensively: one unreadable instance is set aside, not fatal.

The receiver reads an instance only up to (0020,000E) before it answers Success (see
receive/store_handler.py: a full parse on the critical path would halve its throughput), so an
acknowledged instance can still hold a malformed element further on — a Manufacturer encoded as FD
with 18 bytes, sequences nested thousands of levels deep, pixel data cut short. pydicom converts
values lazily, so such a file often opens and fails only when an element is used.

:func:`read_instance` opens a stored file and converts every element at once (the same walk
``route.summarize`` does), and, for a job that reads images, checks that the pixel data is as long
as its image attributes say. Any failure — a pydicom error, ``BytesLengthException``,
``RecursionError``, a truncated file, ``OSError`` — becomes one :class:`UnreadableInstanceError`
whose reason names the failure but never the element's value (it may be a patient's name).
:func:`set_aside` records that reason on the instance (``instances.set_aside_reason``) and logs one
``instance_set_aside`` event without a traceback; set-aside instances are left out of later
summaries and job inputs (store.index.study_instances) and shown by ``dicom-node studies``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.encaps import parse_fragments
from pydicom.pixels.utils import get_expected_length
from sqlalchemy.orm import Session

from dicom_node.errors import UnreadableInstanceError
from dicom_node.log import get_logger
from dicom_node.store.db import Instance
from dicom_node.store.index import set_aside_instance

log = get_logger()

#: Longest reason kept on an instance and in a job's note.
REASON_LIMIT = 300

#: A bytes literal in an exception message (pydicom quotes the raw value it could not convert).
_BYTES_LITERAL = re.compile(r"""b(['"]).*?(?<!\\)\1""", re.DOTALL)


def describe(exc: BaseException) -> str:
    """The failure as one short line, with any raw value in it replaced by ``<value>``."""
    text = _BYTES_LITERAL.sub("<value>", str(exc)).replace("\n", " ").strip()
    return f"{type(exc).__name__}: {text}"[:REASON_LIMIT] if text else type(exc).__name__


def check_dataset(ds: Dataset, *, pixels: bool = False) -> None:
    """Convert every element (nested ones too); with ``pixels``, check the pixel data's length.
    Raises whatever pydicom raises."""
    for element in ds.iterall():
        _ = element.value
    if not pixels or "PixelData" not in ds:
        return
    data = ds.PixelData
    if ds.file_meta.get("TransferSyntaxUID") is not None \
            and ds.file_meta.TransferSyntaxUID.is_encapsulated:
        parse_fragments(data)
        return
    expected = get_expected_length(ds, unit="bytes")
    if len(data) < expected:
        raise ValueError(f"pixel data is {len(data)} bytes, its image attributes need {expected} "
                         "(a truncated instance)")


def read_instance(path: Path, *, headers_only: bool) -> Dataset:
    """Open a stored instance and check it (:func:`check_dataset`); raises
    UnreadableInstanceError, whatever went wrong."""
    try:
        ds = dcmread(path, stop_before_pixels=headers_only)
        check_dataset(ds, pixels=not headers_only)
    except Exception as exc:  # any failure to read one instance sets it aside
        raise UnreadableInstanceError(describe(exc)) from None
    return ds


def set_aside(session: Session, instance: Instance, reason: str, stage: str) -> None:
    """Record why ``instance`` cannot be read (committed with the caller's session) and log it
    once: later stages no longer see it."""
    set_aside_instance(session, instance.sop_instance_uid, reason)
    log.warning("instance_set_aside", study_uid=instance.study_instance_uid,
                series_uid=instance.series_instance_uid,
                sop_instance_uid=instance.sop_instance_uid, stage=stage, reason=reason,
                action="left out of routing and of the jobs' inputs; the rest of the study "
                       "goes on")
