"""Named values of the MPPS SCP: DIMSE statuses (PS3.7 Annex C, PS3.4 F.7.2) and step states.

The statuses are the general N-CREATE / N-SET statuses of PS3.7 Annex C that the node answers;
PS3.4 Table F.7.2-2 adds one Error ID to Processing failure for a step that is already final.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class MppsStatus(IntEnum):
    """N-CREATE and N-SET response statuses of the Modality Performed Procedure Step SOP Class."""

    SUCCESS = 0x0000
    #: A value is not allowed, e.g. a Performed Procedure Step Status other than "IN PROGRESS" in
    #: an N-CREATE, or a UID that breaks the UID grammar.
    INVALID_ATTRIBUTE_VALUE = 0x0106
    #: Our own failure (a database error, an unexpected exception), or an N-SET on a step that is
    #: already COMPLETED or DISCONTINUED (with :data:`ERROR_ID_MAY_NO_LONGER_BE_UPDATED`).
    PROCESSING_FAILURE = 0x0110
    #: An N-CREATE for a SOP Instance UID that already exists.
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: An N-SET for a SOP Instance UID the node never created.
    NO_SUCH_SOP_INSTANCE = 0x0112
    #: The Affected / Requested SOP Instance UID itself is not a valid UID.
    INVALID_OBJECT_INSTANCE = 0x0117
    #: A Type 1 attribute is absent from an N-CREATE.
    MISSING_ATTRIBUTE = 0x0120
    #: A Type 1 attribute is present without a value (N-CREATE), or a value that the final state
    #: requires is still missing when an N-SET completes the step.
    MISSING_ATTRIBUTE_VALUE = 0x0121


#: Error ID (0000,0903) of PS3.4 Table F.7.2-2, sent with PROCESSING_FAILURE on a final step.
ERROR_ID_MAY_NO_LONGER_BE_UPDATED = 0xA710
#: Its Error Comment (0000,0902), as the standard words it.
COMMENT_MAY_NO_LONGER_BE_UPDATED = "Performed Procedure Step Object may no longer be updated"


class StepStatus(StrEnum):
    """Performed Procedure Step Status (0040,0252): the enumerated values of PS3.3 C.4.14."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


#: States after which a step may no longer be updated (PS3.4 F.7.2.2.3).
FINAL_STATUSES = frozenset({StepStatus.COMPLETED, StepStatus.DISCONTINUED})
