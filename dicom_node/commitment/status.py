"""Named values of Storage Commitment Push Model (PS3.4 Annex J): the SOP Class and its
well-known SOP Instance, the action and event types, the Failure Reasons a report gives
(PS3.4 J.3.3.1.1; PS3.3 C.14.1.1), and the N-EVENT-REPORT response statuses the node answers
(PS3.7 Annex C and Table 10.1-1)."""

from __future__ import annotations

from enum import IntEnum

#: Storage Commitment Push Model SOP Class (PS3.4 J.3).
SOP_CLASS_UID = "1.2.840.10008.1.20.1"
#: Its well-known SOP Instance (PS3.4 J.3.5): every request and report names it.
SOP_INSTANCE_UID = "1.2.840.10008.1.20.1.1"
#: Action Type ID of the N-ACTION: Request Storage Commitment (PS3.4 Table J.3-1).
ACTION_REQUEST = 1


class EventType(IntEnum):
    """Event Type ID of the N-EVENT-REPORT (PS3.4 Table J.3-2)."""

    #: Storage Commitment Request Successful: every instance is committed.
    ALL_COMMITTED = 1
    #: Storage Commitment Request Complete – Failures Exist.
    FAILURES_EXIST = 2


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) of a Failed SOP Sequence item."""

    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    RESOURCE_LIMITATION = 0x0213
    REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    CLASS_INSTANCE_CONFLICT = 0x0119
    DUPLICATE_TRANSACTION_UID = 0x0131


def failure_text(reason: int | None) -> str:
    """``0x0112 no such object instance``; for an instance the report left out, saying so."""
    if reason is None:
        return "not in the report"
    try:
        name = FailureReason(reason).name.lower().replace("_", " ")
    except ValueError:
        name = "unknown failure reason"
    return f"0x{reason:04X} {name}"


class ReportStatus(IntEnum):
    """N-EVENT-REPORT response statuses the node answers a commitment report with."""

    SUCCESS = 0x0000
    #: Our own failure: a database error, an unexpected exception.
    PROCESSING_FAILURE = 0x0110
    #: The Affected SOP Instance UID is not the well-known Storage Commitment instance.
    NO_SUCH_SOP_INSTANCE = 0x0112
    #: An Event Type ID other than 1 and 2.
    NO_SUCH_EVENT_TYPE = 0x0113
    #: The Event Information is inappropriate: not decodable, a Transaction UID missing or not
    #: one the node requested, a UID that breaks the grammar, a failed item without a Failure
    #: Reason, an event type that contradicts the sequences.
    INVALID_ARGUMENT_VALUE = 0x0115
    #: The Affected SOP Class UID is not Storage Commitment Push Model.
    NO_SUCH_SOP_CLASS = 0x0118
