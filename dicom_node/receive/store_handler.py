"""The C-STORE handler: validate, spool durably, index, then — and only then — answer Success.

pynetdicom writes each incoming data set straight to a temporary file in ``<data_dir>/incoming``
(``STORE_RECV_CHUNKED_DATASET``), so memory stays bounded whatever the instance size. The handler
reads the few header attributes it needs, checks every UID against the UID grammar, moves the file
into the spool with fsync, commits the index row, and answers. Every failure is answered with a
named status; no exception escapes to pynetdicom.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag, Tag
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config
from dicom_node.errors import InvalidUIDError
from dicom_node.log import get_logger
from dicom_node.monitor.counters import ReceiverCounters
from dicom_node.receive import disk
from dicom_node.receive.status import StoreStatus
from dicom_node.store.index import record_instance
from dicom_node.store.readback import describe
from dicom_node.store.spool import commit_file, fsync_file, instance_path
from dicom_node.uids import validate_uid

_HEADER_TAGS: list[BaseTag | int] = [Tag(k) for k in (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "SoftwareVersions")]

_LAST_HEADER_TAG = Tag("SeriesInstanceUID")


def _past_header(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag > _LAST_HEADER_TAG)


def read_header(path: Path) -> Dataset:
    """The few attributes the receiver needs, reading no further than (0020,000E): a full
    header parse would walk every element up to the pixel data, on the critical path."""
    with open(path, "rb") as handle:
        return read_partial(handle, stop_when=_past_header, specific_tags=_HEADER_TAGS)


#: Software Versions (0018,1020) value that marks an object this node produced (see encode/).
OWN_SOFTWARE_PREFIX = "dicom-node"


def is_own_result(software_versions: object) -> bool:
    """True for an object the node itself made, e.g. our SR coming back from a PACS forward."""
    if software_versions is None:
        return False
    # pydicom gives a str for one value and a MultiValue (a Sequence, not a list) for several.
    values = ([software_versions] if isinstance(software_versions, str | bytes)
              else list(software_versions) if isinstance(software_versions, Iterable)
              else [software_versions])
    return any(str(v).startswith(OWN_SOFTWARE_PREFIX) for v in values if v)

log = get_logger()


@dataclass
class StoreContext:
    """What the handler needs; ``config`` is swapped on reload (a new object, never mutated)."""

    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    #: Threads that fsync a received file while the handler parses its header (os.fsync releases
    #: the GIL, so the two overlap: ~0.4 ms less per instance on the sender's critical path).
    io: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=8, thread_name_prefix="fsync"))
    #: What the SCP counted since it started (Prometheus counters of dicom_node.monitor).
    counters: ReceiverCounters = field(default_factory=ReceiverCounters)


def _refuse(synced: Future[None],
            status: StoreStatus = StoreStatus.CANNOT_UNDERSTAND) -> StoreStatus:
    """Answer a refusal (Cannot understand unless told), once the background fsync of the
    refused file has ended (the file is removed by pynetdicom after the handler returns)."""
    with contextlib.suppress(OSError):
        synced.result()
    return status


class _Mismatch(ValueError):
    """The data set lacks, or contradicts, an identifying attribute of the request: answered
    Data Set does not match SOP Class (A900)."""


def _drop_unindexed(final_path: Path, new_file: bool) -> None:
    """After a failed index commit: remove the file the spool got for a new instance (the
    sender was not answered Success, and no row names it). A replaced copy stays: the index
    row of the instance names that path."""
    if new_file:
        with contextlib.suppress(OSError):
            final_path.unlink()


def handle_store(event: Any, context: StoreContext) -> int:
    """EVT_C_STORE handler (bound with ``[context]``)."""
    if not disk.written(event):  # below node.min_free_mb, or the write failed (disk.py)
        return StoreStatus.OUT_OF_RESOURCES
    temp_path = event.dataset_path
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    request = event.request
    config = context.config
    synced = context.io.submit(fsync_file, temp_path)
    sop_uid = ""
    try:
        sop_uid = validate_uid(request.AffectedSOPInstanceUID, "SOP Instance UID")
        sop_class = validate_uid(request.AffectedSOPClassUID, "SOP Class UID")
        header = read_header(temp_path)
        study_uid = validate_uid(header.get("StudyInstanceUID"), "Study Instance UID")
        series_uid = validate_uid(header.get("SeriesInstanceUID"), "Series Instance UID")
        # Later stages (summary, encoders) identify an instance by the data set's own UIDs: an
        # instance without them is refused here, not accepted under the request's UIDs.
        for keyword, requested in (("SOPInstanceUID", sop_uid), ("SOPClassUID", sop_class)):
            if keyword not in header:
                raise _Mismatch(f"the data set has no {keyword}")
            if str(header.get(keyword)).strip() != requested:
                raise _Mismatch(f"{keyword} in the data set differs from the C-STORE "
                                "request's Affected one")
        modality = str(header.get("Modality", "")).strip()[:16]
        transfer_syntax = str(header.file_meta.TransferSyntaxUID)
        own_result = is_own_result(header.get("SoftwareVersions"))
    except InvalidUIDError as exc:
        log.warning("instance_refused", reason=str(exc), calling_ae=calling_ae)
        return _refuse(synced)
    except _Mismatch as exc:
        log.warning("instance_refused", reason=str(exc), calling_ae=calling_ae,
                    sop_instance_uid=sop_uid, status=StoreStatus.DATASET_MISMATCH.name)
        return _refuse(synced, StoreStatus.DATASET_MISMATCH)
    except (InvalidDicomError, BytesLengthException, OSError, ValueError, KeyError,
            AttributeError, TypeError, EOFError, RecursionError) as exc:
        # pydicom's errors on a malformed header (RecursionError: sequences nested thousands
        # of levels deep before (0020,000E)); named, so no traceback for a peer's bad data.
        log.warning("instance_refused", reason=f"unreadable data set: {describe(exc)}",
                    calling_ae=calling_ae, sop_instance_uid=sop_uid)
        return _refuse(synced)
    except Exception as exc:  # never let an exception reach pynetdicom
        log.exception("instance_refused", reason=f"unexpected: {exc!r}", calling_ae=calling_ae)
        return _refuse(synced)

    final_path = instance_path(config.spool_dir, study_uid, series_uid, sop_uid)
    #: The spool had no copy of this instance before: one the index does not take is removed.
    new_file = False
    try:
        synced.result()
        size = temp_path.stat().st_size
        new_file = not final_path.exists()
        replaced = commit_file(temp_path, final_path, synced=True,
                               replace=config.node.on_duplicate == "replace")
        stored = record_instance(
            context.engine, sop_instance_uid=sop_uid, sop_class_uid=sop_class,
            study_instance_uid=study_uid, series_instance_uid=series_uid,
            transfer_syntax_uid=transfer_syntax, modality=modality, path=final_path,
            relative_path=str(final_path.relative_to(config.node.data_dir)), size=size,
            calling_ae_title=calling_ae, update_existing=replaced, own_result=own_result)
    except OSError as exc:
        log.error("instance_not_stored", reason=f"spool write failed: {exc}",
                  study_uid=study_uid, sop_instance_uid=sop_uid)
        return StoreStatus.OUT_OF_RESOURCES
    except SQLAlchemyError as exc:
        _drop_unindexed(final_path, new_file)
        log.error("instance_not_stored", reason=f"index commit failed: {type(exc).__name__}",
                  study_uid=study_uid, sop_instance_uid=sop_uid)
        return StoreStatus.OUT_OF_RESOURCES
    except Exception as exc:  # never let an exception reach pynetdicom
        _drop_unindexed(final_path, new_file)
        log.exception("instance_not_stored", reason=f"unexpected: {exc!r}",
                      study_uid=study_uid, sop_instance_uid=sop_uid)
        return StoreStatus.PROCESSING_FAILURE
    if own_result:
        log.info("own_result_received", study_uid=study_uid, sop_instance_uid=sop_uid,
                 reason="an object this node made came back; stored, the study is not reopened")
    if stored.reopened_study:
        log.warning("study_reopened", study_uid=study_uid, sop_instance_uid=sop_uid,
                    reason="instance arrived after the study was processed")
    log.debug("instance_stored", study_uid=study_uid, series_uid=series_uid,
              sop_instance_uid=sop_uid, modality=modality, calling_ae=calling_ae,
              transfer_syntax=transfer_syntax, bytes=size, duplicate=stored.duplicate)
    return StoreStatus.SUCCESS
