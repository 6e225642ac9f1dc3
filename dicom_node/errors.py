"""The exceptions dicom-node raises, in one place.

::

    DicomNodeError
    ├── ConfigError            config.toml (or a model card) is invalid; the message names the key
    ├── StoreError             the spool or the index could not take an instance
    │   ├── InvalidUIDError    a UID that does not follow the UID grammar (PS3.5 §9.1)
    │   └── UnreadableInstanceError  a stored instance that later stages cannot read (set aside)
    ├── ModelError             a model could not be loaded or run
    │   └── PreprocessingError an image could not be turned into the model's input
    │       └── UndecodableInstanceError  one instance's pixel data cannot be decoded (the job
    │                                     sets it aside and runs on the others)
    ├── EncodeError            a result could not be encoded as valid DICOM
    ├── SendError              a destination refused, or could not be reached
    │   └── DestinationUnreachable  it could not be reached: refused connection, TLS handshake,
    │                               rejected or aborted association, timeout (an outage)
    └── WorklistError          the Modality Worklist SCP refused, failed or could not be reached
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base class of every error raised on purpose by dicom-node."""


class ConfigError(DicomNodeError):
    """The configuration (or a model card it names) is invalid."""


class StoreError(DicomNodeError):
    """An instance could not be stored durably."""


class InvalidUIDError(StoreError):
    """A UID that does not follow the DICOM UID grammar."""


class UnreadableInstanceError(StoreError):
    """A stored instance that cannot be read or converted (store.readback); it is set aside."""


class ModelError(DicomNodeError):
    """A model could not be loaded or run."""


class PreprocessingError(ModelError):
    """An image could not be turned into the model's input."""


class UndecodableInstanceError(PreprocessingError):
    """One source instance's pixel data cannot be decoded (a corrupt compressed frame whose
    fragments parse): the job sets that instance aside and runs its model on the others."""

    def __init__(self, message: str, sop_instance_uid: str) -> None:
        super().__init__(message)
        self.sop_instance_uid = sop_instance_uid


class EncodeError(DicomNodeError):
    """A result could not be encoded as a DICOM object."""


class SendError(DicomNodeError):
    """A C-STORE to a destination failed."""


class DestinationUnreachable(SendError):
    """The destination could not be reached, or stopped answering: the connection was refused
    or timed out, the TLS handshake failed, the association was rejected or aborted, a request
    got no answer. A destination problem (an outage), not a failure of the job: its delivery is
    retried for ``jobs.delivery_window_hours`` (dicom_node.send.outages)."""


class WorklistError(DicomNodeError):
    """A Modality Worklist query failed; the message names the SCP (AE@host:port) and why.

    ``reason`` is the why alone (e.g. ``cannot connect: [Errno 111] Connection refused``), for
    log events that name the SCP in fields of their own."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message
