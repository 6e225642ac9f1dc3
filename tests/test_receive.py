"""The receiver over real loopback associations: DCMTK's tools and pynetdicom as the peers."""

from __future__ import annotations

import os
import subprocess
import warnings

import pytest
from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE
from sqlalchemy import select
from structlog.testing import capture_logs

from dicom_node.receive.scp import Receiver
from dicom_node.receive.status import StoreStatus
from dicom_node.store.db import Instance, Study, StudyState
from tests.conftest import sample_file

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
                          check=False)


def _instances(receiver: Receiver) -> list[Instance]:
    with receiver.context.sessions() as session:
        return list(session.scalars(select(Instance)))


def _send(receiver: Receiver, ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian,
          calling_ae: str = "TESTSCU") -> int:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, transfer_syntax)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs we send
            status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def test_echoscu_gets_success(receiver: Receiver) -> None:
    result = dcmtk("echoscu", "-aec", "DICOM_NODE", "127.0.0.1", str(receiver.port))
    assert result.returncode == 0, result.stderr


def test_storescu_instances_are_spooled_and_indexed(receiver: Receiver) -> None:
    files = [sample_file("CT_small.dcm"), sample_file("MR_small.dcm")]
    result = dcmtk("storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(receiver.port),
                   *map(str, files))
    assert result.returncode == 0, result.stderr
    stored = {i.sop_instance_uid: i for i in _instances(receiver)}
    for path in files:
        source = dcmread(path)
        row = stored[source.SOPInstanceUID]
        spooled = receiver.context.config.node.data_dir / row.path
        assert dcmread(spooled).PixelData == source.PixelData
        assert row.study_instance_uid == source.StudyInstanceUID
        assert row.calling_ae_title == "STORESCU"
    assert not [p for p in receiver.context.config.incoming_dir.rglob("*") if p.is_file()]


@pytest.mark.parametrize("name, transfer_syntax", [
    ("JPEG2000.dcm", JPEG2000),
    ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit),
    ("MR_small_RLE.dcm", RLELossless),
    ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
])
def test_compressed_transfer_syntaxes_are_accepted_as_sent(
        receiver: Receiver, name: str, transfer_syntax: str | None) -> None:
    ds = dcmread(sample_file(name))
    sent_ts = str(ds.file_meta.TransferSyntaxUID)
    if transfer_syntax is not None:
        assert sent_ts == transfer_syntax
    assert _send(receiver, ds, sent_ts) == StoreStatus.SUCCESS
    (row,) = [i for i in _instances(receiver) if i.sop_instance_uid == ds.SOPInstanceUID]
    assert row.transfer_syntax_uid == sent_ts
    stored = dcmread(receiver.context.config.node.data_dir / row.path)
    assert stored.file_meta.TransferSyntaxUID == sent_ts


def test_jpegls_lossless_is_accepted(receiver: Receiver) -> None:
    ds = dcmread(sample_file("MR_small_jpeg_ls_lossless.dcm"))
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert _send(receiver, ds, JPEGLSLossless) == StoreStatus.SUCCESS


@pytest.mark.parametrize("attribute", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_store_rejects_uid_with_path_separator(receiver: Receiver, attribute: str) -> None:
    ds = dcmread(sample_file("CT_small.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setattr(ds, attribute, "../../../etc/x")
    with capture_logs() as logs:
        status = _send(receiver, ds)
    assert status == StoreStatus.CANNOT_UNDERSTAND
    assert _instances(receiver) == []
    data_dir = receiver.context.config.node.data_dir
    written = [p for p in data_dir.parent.rglob("*") if p.is_file() and p.suffix != ".toml"
               and not p.name.startswith("dicom-node.db")]
    assert written == []
    assert any(e["event"] == "instance_refused" and "not a valid UID" in e["reason"]
               for e in logs)


def test_duplicate_sop_instance_replaces_the_stored_copy(receiver: Receiver) -> None:
    ds = dcmread(sample_file("CT_small.dcm"))
    assert _send(receiver, ds) == StoreStatus.SUCCESS
    ds.SeriesDescription = "corrected"
    assert _send(receiver, ds) == StoreStatus.SUCCESS
    (row,) = _instances(receiver)
    stored = dcmread(receiver.context.config.node.data_dir / row.path)
    assert stored.SeriesDescription == "corrected"
    with receiver.context.sessions() as session:
        assert session.get(Study, ds.StudyInstanceUID).instance_count == 1  # type: ignore


def test_calling_ae_not_on_the_allow_list_is_rejected(receiver: Receiver) -> None:
    config = receiver.context.config
    receiver.reconfigure(config.model_copy(update={"node": config.node.model_copy(
        update={"allowed_calling_aets": ("MODALITY1",)})}))
    with capture_logs() as logs:
        refused = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "DICOM_NODE", "127.0.0.1",
                        str(receiver.port))
    assert refused.returncode != 0
    (rejected,) = [e for e in logs if e["event"] == "association_rejected"]
    assert rejected["reason"] == "calling AE title 'INTRUDER' is not in node.allowed_calling_aets"
    allowed = dcmtk("echoscu", "-aet", "MODALITY1", "-aec", "DICOM_NODE", "127.0.0.1",
                    str(receiver.port))
    assert allowed.returncode == 0, allowed.stderr


def test_a_wrong_called_ae_title_is_rejected_when_checked(receiver: Receiver) -> None:
    wrong = dcmtk("echoscu", "-aec", "NOT_THE_NODE", "127.0.0.1", str(receiver.port))
    assert wrong.returncode == 0, wrong.stderr  # off by default, like most PACS
    config = receiver.context.config
    receiver.reconfigure(config.model_copy(update={"node": config.node.model_copy(
        update={"check_called_ae_title": True})}))
    with capture_logs() as logs:
        wrong = dcmtk("echoscu", "-aec", "NOT_THE_NODE", "127.0.0.1", str(receiver.port))
        right = dcmtk("echoscu", "-aec", "DICOM_NODE", "127.0.0.1", str(receiver.port))
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr
    assert right.returncode == 0, right.stderr
    (rejected,) = [e for e in logs if e["event"] == "association_rejected"]
    assert rejected["reason"] == ("called AE title 'NOT_THE_NODE' is not this node's "
                                  "'DICOM_NODE' (node.check_called_ae_title)")


def test_association_beyond_the_limit_is_rejected(receiver: Receiver) -> None:
    config = receiver.context.config
    receiver.reconfigure(config.model_copy(update={"node": config.node.model_copy(
        update={"max_associations": 1})}))
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", receiver.port, ae_title="DICOM_NODE")
    assert first.is_established
    try:
        with capture_logs() as logs:
            second = dcmtk("echoscu", "-aec", "DICOM_NODE", "127.0.0.1", str(receiver.port))
        assert second.returncode != 0
        (rejected,) = [e for e in logs if e["event"] == "association_rejected"]
        assert rejected["reason"] == "1 associations already open (node.max_associations)"
    finally:
        first.release()


def test_instance_after_processing_reopens_the_study(receiver: Receiver) -> None:
    ds = dcmread(sample_file("CT_small.dcm"))
    assert _send(receiver, ds) == StoreStatus.SUCCESS
    with receiver.context.sessions.begin() as session:
        study = session.get(Study, ds.StudyInstanceUID)
        assert study is not None
        study.state = StudyState.DONE
    late = dcmread(sample_file("CT_small.dcm"))
    late.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    with capture_logs() as logs:
        assert _send(receiver, late) == StoreStatus.SUCCESS
    with receiver.context.sessions() as session:
        study = session.get(Study, ds.StudyInstanceUID)
        assert study is not None
        assert (study.state, study.generation, study.instance_count) == (
            StudyState.RECEIVING, 1, 2)
    assert any(e["event"] == "study_reopened" for e in logs)


def test_instance_without_study_uid_gets_cannot_understand(receiver: Receiver) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    # no Study/Series Instance UID: nothing to file it under
    assert _send(receiver, ds) == StoreStatus.CANNOT_UNDERSTAND
    assert _instances(receiver) == []


def _processed(receiver: Receiver, study_uid: str) -> None:
    with receiver.context.sessions.begin() as session:
        study = session.get(Study, study_uid)
        assert study is not None
        study.state = StudyState.DONE


def test_resent_instance_does_not_reopen_a_processed_study(receiver: Receiver) -> None:
    ds = dcmread(sample_file("CT_small.dcm"))
    assert _send(receiver, ds) == StoreStatus.SUCCESS
    _processed(receiver, ds.StudyInstanceUID)
    assert _send(receiver, ds) == StoreStatus.SUCCESS  # a PACS re-forwarding the whole study
    with receiver.context.sessions() as session:
        study = session.get(Study, ds.StudyInstanceUID)
        assert study is not None
        assert (study.state, study.generation) == (StudyState.DONE, 0)


def test_the_nodes_own_result_coming_back_does_not_reopen_the_study(receiver: Receiver) -> None:
    from dicom_node.encode.sr import build_classification_sr
    from dicom_node.messages import ClassificationResult, CodedConcept, Finding, ModelIdentity
    from dicom_node.uids import result_uids

    source = dcmread(sample_file("CT_small.dcm"))
    assert _send(receiver, source) == StoreStatus.SUCCESS
    _processed(receiver, source.StudyInstanceUID)
    model = ModelIdentity("m", "1.0", "dicom-node project", synthetic_training_data=True)
    result = ClassificationResult(model, (Finding(CodedConcept("8186001", "SCT", "Cardiomegaly"),
                                                  0.9, 0.5),), (source.SOPInstanceUID,))
    sr = build_classification_sr([source], result,
                                 result_uids(source.StudyInstanceUID, "r", "m", "1.0", "sr"), "r")
    with capture_logs() as logs:
        assert _send(receiver, sr) == StoreStatus.SUCCESS
    with receiver.context.sessions() as session:
        study = session.get(Study, source.StudyInstanceUID)
        assert study is not None
        assert (study.state, study.generation, study.instance_count) == (StudyState.DONE, 0, 2)
    assert any(e["event"] == "own_result_received" for e in logs)


def test_keep_policy_keeps_the_first_copy_and_its_index_row(receiver: Receiver) -> None:
    config = receiver.context.config
    receiver.reconfigure(config.model_copy(update={"node": config.node.model_copy(
        update={"on_duplicate": "keep"})}))
    ds = dcmread(sample_file("CT_small.dcm"))
    assert _send(receiver, ds) == StoreStatus.SUCCESS
    ds.SeriesDescription = "second copy"
    assert _send(receiver, ds, calling_ae="OTHER") == StoreStatus.SUCCESS
    (row,) = _instances(receiver)
    assert row.calling_ae_title == "TESTSCU"
    stored = dcmread(receiver.context.config.node.data_dir / row.path)
    assert stored.get("SeriesDescription") != "second copy"


def test_an_instance_the_index_cannot_take_gets_out_of_resources_and_leaves_no_spool_file(
        receiver: Receiver) -> None:
    """A failed index commit (here the instances table is gone, for real) is answered A700 and
    the file renamed into the spool for it is removed: nothing unindexed stays behind."""
    ds = dcmread(sample_file("CT_small.dcm"))
    with receiver.context.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE instances RENAME TO instances_gone")
    try:
        with capture_logs() as logs:
            assert _send(receiver, ds) == StoreStatus.OUT_OF_RESOURCES
    finally:
        with receiver.context.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE instances_gone RENAME TO instances")
    assert [e["reason"] for e in logs if e["event"] == "instance_not_stored"] == [
        "index commit failed: OperationalError"]
    spool = receiver.context.config.spool_dir
    assert not [p for p in spool.rglob("*") if p.is_file()]
    assert _send(receiver, ds) == StoreStatus.SUCCESS
    assert [p.name for p in spool.rglob("*.dcm")] == [f"{ds.SOPInstanceUID}.dcm"]
