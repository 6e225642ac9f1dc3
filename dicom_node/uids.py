"""Deterministic UIDs for result objects, and the UID grammar check for incoming ones.

A job that runs twice must send the same SOP Instance UIDs, so the PACS sees a re-send and not a
second result. Result UIDs are therefore name-based UUIDs (RFC 4122 version 5) in the ``2.25.``
form of PS3.5 §B.2, derived from the source study, the route, the model's name and version and the
kind of object — never random.
"""

from __future__ import annotations

import hashlib
import uuid

from pydicom.uid import RE_VALID_UID

from dicom_node.errors import InvalidUIDError
from dicom_node.messages import ResultUIDs

#: Series numbers of results live in this range, away from the modality's own series.
RESULT_SERIES_BASE = 9000
#: Namespace of dicom-node's name-based UUIDs (a uuid5 of a URN in the URL namespace).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-node:results")


def validate_uid(value: object, what: str) -> str:
    """Return ``value`` if it is a valid UID (PS3.5 §9.1), else raise InvalidUIDError naming it."""
    text = str(value) if value is not None else ""
    if not text or len(text) > 64 or RE_VALID_UID.match(text) is None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidUIDError(
            f"{what} {shown!r} is not a valid UID (PS3.5 §9.1 grammar, ≤64 chars)")
    return text


def result_uids(study_uid: str, route: str, model: str, version: str, kind: str) -> ResultUIDs:
    """The UIDs of one result object; the same inputs always give the same UIDs."""
    name = "\x00".join([study_uid, route, model, version, kind])
    series_uid = "2.25." + str(uuid.uuid5(_NAMESPACE, name + "\x00series").int)
    sop_uid = "2.25." + str(uuid.uuid5(_NAMESPACE, name + "\x00instance").int)
    digest = hashlib.sha256(name.encode()).digest()
    series_number = RESULT_SERIES_BASE + int.from_bytes(digest[:2], "big") % 900
    return ResultUIDs(series_uid, sop_uid, series_number)
