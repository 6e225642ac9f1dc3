"""Encoded data sets with faults, element by element, and a sender that sends them unchanged.

A data set is kept as its encoded elements (Explicit VR Little Endian), keyed by tag, so a test can
replace one element by bytes pydicom would never write — a wrong VR, a length that does not fit
the value, sequences nested thousands of levels deep — drop an element, or cut the whole thing
short. pynetdicom's ``send_c_store`` given a file path with ``STORE_SEND_CHUNKED_DATASET`` sends
the file's data set as it is on disk, without decoding it (association.py: it only splits off the
file meta), so the bytes reach the node's receiver unchanged, over a real association.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt

from dicom_node.receive.scp import set_nodelay
from tests.conftest import sample_file

#: VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT",
                      "UV"})

#: A root of our own for test UIDs (2.25 would need a UUID; this keeps them short and readable).
UID_ROOT = "1.2.826.0.1.3680043.10.1001"

_ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def tag_of(keyword_or_tag: str | int) -> int:
    return int(Tag(keyword_or_tag))


def element_bytes(element: DataElement) -> bytes:
    """One element, encoded as pydicom writes it (Explicit VR Little Endian)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_data_element(buffer, element)
    return buffer.getvalue()


def raw_element(tag: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """An element as bytes, with any VR and any declared length (the value's own by default)."""
    declared = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    head += (b"\0\0" + struct.pack("<I", declared)) if vr in LONG_VRS \
        else struct.pack("<H", declared & 0xFFFF)
    return head + value


def nested_sequence(tag: int, depth: int) -> bytes:
    """A sequence of undefined length whose single item holds the same sequence, ``depth`` deep."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\0\0\xff\xff\xff\xff"
    return (head + _ITEM) * depth + (_ITEM_END + _SEQUENCE_END) * depth


@dataclass
class Encoded:
    """A data set as encoded elements, plus the file meta it is sent with."""

    meta: FileMetaDataset
    elements: dict[int, bytes] = field(default_factory=dict)
    #: Keep only this many bytes of the encoded data set (None: all of it).
    cut_at: int | None = None

    @property
    def sop_instance_uid(self) -> str:
        return str(self.meta.MediaStorageSOPInstanceUID)

    def dataset_bytes(self) -> bytes:
        data = b"".join(self.elements[t] for t in sorted(self.elements))
        return data if self.cut_at is None else data[:self.cut_at]

    def replace(self, keyword_or_tag: str | int, raw: bytes) -> None:
        self.elements[tag_of(keyword_or_tag)] = raw

    def drop(self, keyword_or_tag: str | int) -> None:
        self.elements.pop(tag_of(keyword_or_tag), None)

    def write(self, path: Path) -> Path:
        buffer = DicomBytesIO()
        write_file_meta_info(buffer, self.meta, enforce_standard=True)
        path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + self.dataset_bytes())
        return path


def encode(ds: Dataset) -> Encoded:
    """``ds`` element by element; its file meta says Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return Encoded(meta, {int(e.tag): element_bytes(e) for e in ds})


def instance(name: str, study_uid: str, series_uid: str, sop_uid: str,
             pixels: bool = True) -> Dataset:
    """A copy of a sample file under new UIDs (without its pixel data if not ``pixels``)."""
    ds = dcmread(sample_file(name), stop_before_pixels=not pixels)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    del ds.file_meta
    return ds


@contextmanager
def raw_sending() -> Iterator[None]:
    """pynetdicom sends a file's data set as its bytes, undecoded, while the block runs."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def send_raw(port: int, paths: Sequence[Path], *, called: str = "DICOM_NODE",
             timeout: float = 30.0) -> list[int | None]:
    """C-STORE every file over one association, as its bytes are; the statuses, None where no
    response came."""
    sop_classes = sorted({str(read_file_meta_info(p).MediaStorageSOPClassUID) for p in paths})
    ae = AE(ae_title="FUZZER")
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = timeout
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    # TCP_NODELAY on our side too (PEERS.md): else each C-STORE waits for a delayed ACK
    assoc = ae.associate("127.0.0.1", port, ae_title=called,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established, "the receiver did not accept the association"
    statuses: list[int | None] = []
    try:
        with raw_sending(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for path in paths:
                answer = assoc.send_c_store(path)
                statuses.append(int(answer.Status) if "Status" in answer else None)
    finally:
        assoc.release()
    return statuses
