"""Named DIMSE status codes that the receiver answers (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses of the Storage Service Class (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    #: Refused: Out of Resources — the disk or the index could not take the instance.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class — e.g. no SOP Instance UID in the data set, or
    #: not the one the C-STORE request names.
    DATASET_MISMATCH = 0xA900
    #: Error: Cannot understand — e.g. a UID that breaks the UID grammar, an unreadable data set.
    CANNOT_UNDERSTAND = 0xC000
    #: Failure: Processing failure (PS3.7 C.4.2) — anything unexpected in our own code.
    PROCESSING_FAILURE = 0x0110


class EchoStatus(IntEnum):
    SUCCESS = 0x0000
