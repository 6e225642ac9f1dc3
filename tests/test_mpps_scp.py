"""The MPPS SCP over real loopback associations: a pynetdicom modality against the Receiver."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityPerformedProcedureStep,
)
from sqlalchemy import select
from structlog.testing import capture_logs

from dicom_node.config import Config, load_config
from dicom_node.mpps import store as mpps_store
from dicom_node.mpps.status import (
    COMMENT_MAY_NO_LONGER_BE_UPDATED,
    ERROR_ID_MAY_NO_LONGER_BE_UPDATED,
    MppsStatus,
)
from dicom_node.mpps.store import (
    list_performed_steps,
    performed_steps_for_study,
    studies_with_final_steps,
)
from dicom_node.receive.scp import Receiver
from dicom_node.receive.status import StoreStatus
from dicom_node.store.db import PerformedStep, PerformedStudy, make_engine, utcnow
from tests.conftest import BASIC_CONFIG, free_port, running_receiver, sample_file, write_config
from tests.support.mpps_scu import (
    PATIENT_ID,
    PATIENT_NAME,
    mpps_association,
    mpps_completed_dataset,
    mpps_create_dataset,
    mpps_discontinued_dataset,
    send_mpps,
    send_mpps_create_without_uid,
    send_mpps_set,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
AET = "DICOM_NODE"
HOST = "127.0.0.1"


def _config(folder: Path, mpps: str) -> Config:
    text = BASIC_CONFIG.format(port=free_port(), stable=1, node_extra="") + mpps
    return load_config(write_config(folder, text))


@pytest.fixture
def mpps_receiver(tmp_path: Path) -> Iterator[Receiver]:
    """The real SCP with [mpps] enabled, in this process, on a free loopback port."""
    with running_receiver(_config(tmp_path, "\n[mpps]\nenabled = true\n")) as rx:
        yield rx


def _step(rx: Receiver, uid: str) -> PerformedStep | None:
    with rx.context.sessions() as session:
        return session.get(PerformedStep, uid)


def _studies(rx: Receiver, uid: str) -> list[str]:
    with rx.context.sessions() as session:
        return sorted(session.scalars(select(PerformedStudy.study_instance_uid)
                                      .where(PerformedStudy.mpps_uid == uid)))


def _series(n_series: int = 2, n_images: int = 3) -> dict[str, list[tuple[str, str]]]:
    return {generate_uid(): [(CT, generate_uid()) for _ in range(n_images)]
            for _ in range(n_series)}


def _create(rx: Receiver, study_uid: str,
            set_ds: Dataset | None = None) -> tuple[str, int, int | None]:
    uid = generate_uid()
    created, updated = send_mpps(HOST, rx.port, AET, mpps_create_dataset(study_uid), set_ds,
                                 mpps_uid=uid)
    return uid, created, updated


# --- N-CREATE ---------------------------------------------------------------------------------

def test_n_create_in_progress_stores_the_step_and_one_row_per_study(
        mpps_receiver: Receiver) -> None:
    study_a, study_b = generate_uid(), generate_uid()
    uid = generate_uid()
    create = mpps_create_dataset([study_a, study_b, study_a], "MR", station_ae="MR_SCANNER2")
    with mpps_association(HOST, mpps_receiver.port, AET, "MR_CONSOLE") as assoc:
        status, reply = assoc.send_n_create(create, ModalityPerformedProcedureStep, uid)
    assert status.Status == MppsStatus.SUCCESS
    assert reply is not None
    assert reply.PerformedProcedureStepStatus == "IN PROGRESS"
    assert reply.PerformedProcedureStepID == "PPS-0815"
    step = _step(mpps_receiver, uid)
    assert step is not None
    assert (step.status, step.modality, step.station_ae_title, step.calling_ae_title) == (
        "IN PROGRESS", "MR", "MR_SCANNER2", "MR_CONSOLE")
    assert json.loads(step.performed_series) == {}
    assert step.discontinuation_reason is None
    assert _studies(mpps_receiver, uid) == sorted([study_a, study_b])
    stored = Dataset.from_json(step.attributes_json)
    assert stored.PatientName == PATIENT_NAME  # the database keeps the whole instance
    assert stored.ScheduledStepAttributesSequence[0].StudyInstanceUID == study_a


def test_n_create_without_instance_uid_gets_one_from_the_node(mpps_receiver: Receiver) -> None:
    study = generate_uid()
    status, uid = send_mpps_create_without_uid(HOST, mpps_receiver.port, AET,
                                               mpps_create_dataset(study))
    assert status == MppsStatus.SUCCESS
    assert uid is not None and uid.startswith("2.25.")
    assert _studies(mpps_receiver, uid) == [study]


def test_duplicate_n_create_is_refused_and_keeps_the_first_step(
        mpps_receiver: Receiver) -> None:
    study = generate_uid()
    uid, created, _ = _create(mpps_receiver, study)
    assert created == MppsStatus.SUCCESS
    again, _ = send_mpps(HOST, mpps_receiver.port, AET,
                         mpps_create_dataset(generate_uid(), "MR"), mpps_uid=uid)
    assert again == MppsStatus.DUPLICATE_SOP_INSTANCE
    step = _step(mpps_receiver, uid)
    assert step is not None and step.modality == "CT"
    assert _studies(mpps_receiver, uid) == [study]


def test_n_create_with_status_completed_is_refused_as_invalid_value(
        mpps_receiver: Receiver) -> None:
    create = mpps_create_dataset(generate_uid())
    create.PerformedProcedureStepStatus = "COMPLETED"
    uid = generate_uid()
    with capture_logs() as logs, mpps_association(HOST, mpps_receiver.port, AET) as assoc:
        status, reply = assoc.send_n_create(create, ModalityPerformedProcedureStep, uid)
    assert status.Status == MppsStatus.INVALID_ATTRIBUTE_VALUE
    assert "IN PROGRESS" in status.ErrorComment
    assert reply is None
    assert _step(mpps_receiver, uid) is None
    (refused,) = [e for e in logs if e["event"] == "mpps_refused"]
    assert (refused["mpps_uid"], refused["status"]) == (uid, "0x0106")


@pytest.mark.parametrize("keyword", [
    "ScheduledStepAttributesSequence", "PerformedProcedureStepID", "PerformedStationAETitle",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "Modality",
    "PerformedProcedureStepStatus"])
def test_n_create_without_a_type1_attribute_is_refused_as_missing_attribute(
        mpps_receiver: Receiver, keyword: str) -> None:
    create = mpps_create_dataset(generate_uid())
    delattr(create, keyword)
    uid = generate_uid()
    with mpps_association(HOST, mpps_receiver.port, AET) as assoc:
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, uid)
    assert status.Status == MppsStatus.MISSING_ATTRIBUTE
    assert keyword in status.ErrorComment
    assert _step(mpps_receiver, uid) is None


def test_n_create_with_a_scheduled_step_item_without_study_uid_is_refused(
        mpps_receiver: Receiver) -> None:
    create = mpps_create_dataset(generate_uid())
    del create.ScheduledStepAttributesSequence[0].StudyInstanceUID
    uid = generate_uid()
    created, _ = send_mpps(HOST, mpps_receiver.port, AET, create, mpps_uid=uid)
    assert created == MppsStatus.MISSING_ATTRIBUTE
    assert _step(mpps_receiver, uid) is None


def test_n_create_with_an_empty_type1_attribute_is_refused_as_missing_value(
        mpps_receiver: Receiver) -> None:
    create = mpps_create_dataset(generate_uid())
    create.PerformedProcedureStepID = ""
    created, _ = send_mpps(HOST, mpps_receiver.port, AET, create)
    assert created == MppsStatus.MISSING_ATTRIBUTE_VALUE


def test_n_create_with_a_malformed_study_uid_is_refused_as_invalid_value(
        mpps_receiver: Receiver) -> None:
    with capture_logs() as logs, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value, both sides
        created, _ = send_mpps(HOST, mpps_receiver.port, AET, mpps_create_dataset("1.2.03.x"))
    assert created == MppsStatus.INVALID_ATTRIBUTE_VALUE
    (refused,) = [e for e in logs if e["event"] == "mpps_refused"]
    assert "not a valid UID" in refused["reason"]


# --- N-SET ------------------------------------------------------------------------------------

def test_n_set_completed_stores_status_series_and_instances(mpps_receiver: Receiver) -> None:
    series = _series(2, 3)
    sr_series = generate_uid()
    series[sr_series] = [(ENHANCED_SR, generate_uid())]
    uid, created, updated = _create(mpps_receiver, generate_uid(),
                                    mpps_completed_dataset(series))
    assert (created, updated) == (MppsStatus.SUCCESS, MppsStatus.SUCCESS)
    step = _step(mpps_receiver, uid)
    assert step is not None and step.status == "COMPLETED"
    assert json.loads(step.performed_series) == {
        s: [sop for _cls, sop in instances] for s, instances in series.items()}
    stored = Dataset.from_json(step.attributes_json)
    assert stored.PerformedProcedureStepEndTime == "093130"
    assert stored.PatientName == PATIENT_NAME  # N-CREATE attributes survive the N-SET


def test_n_set_returns_the_attributes_it_applied(mpps_receiver: Receiver) -> None:
    uid = generate_uid()
    with mpps_association(HOST, mpps_receiver.port, AET) as assoc:
        assoc.send_n_create(mpps_create_dataset(generate_uid()),
                            ModalityPerformedProcedureStep, uid)
        status, reply = assoc.send_n_set(mpps_completed_dataset(_series(1, 1)),
                                         ModalityPerformedProcedureStep, uid)
    assert status.Status == MppsStatus.SUCCESS
    assert reply is not None
    assert reply.PerformedProcedureStepStatus == "COMPLETED"
    assert len(reply.PerformedSeriesSequence) == 1


def test_in_progress_n_sets_accumulate_until_the_final_one(mpps_receiver: Receiver) -> None:
    uid, _, _ = _create(mpps_receiver, generate_uid())
    series = _series(1, 2)
    progress = Dataset()
    progress.PerformedSeriesSequence = mpps_completed_dataset(series).PerformedSeriesSequence
    assert send_mpps_set(HOST, mpps_receiver.port, AET, uid, progress) == MppsStatus.SUCCESS
    step = _step(mpps_receiver, uid)
    assert step is not None and step.status == "IN PROGRESS"
    assert len(json.loads(step.performed_series)) == 1
    final = Dataset()  # the series were sent before: the final N-SET carries only the end
    final.PerformedProcedureStepStatus = "COMPLETED"
    final.PerformedProcedureStepEndDate = "20250304"
    final.PerformedProcedureStepEndTime = "093130"
    assert send_mpps_set(HOST, mpps_receiver.port, AET, uid, final) == MppsStatus.SUCCESS
    step = _step(mpps_receiver, uid)
    assert step is not None and step.status == "COMPLETED"
    assert json.loads(step.performed_series) == {
        s: [sop for _cls, sop in instances] for s, instances in series.items()}


def test_n_set_after_completed_is_refused_as_processing_failure(
        mpps_receiver: Receiver) -> None:
    uid, _, updated = _create(mpps_receiver, generate_uid(), mpps_completed_dataset(_series()))
    assert updated == MppsStatus.SUCCESS
    before = _step(mpps_receiver, uid)
    late = mpps_discontinued_dataset()
    with mpps_association(HOST, mpps_receiver.port, AET) as assoc:
        status, _ = assoc.send_n_set(late, ModalityPerformedProcedureStep, uid)
    assert status.Status == MppsStatus.PROCESSING_FAILURE
    assert status.ErrorComment == COMMENT_MAY_NO_LONGER_BE_UPDATED
    assert status.ErrorID == ERROR_ID_MAY_NO_LONGER_BE_UPDATED
    after = _step(mpps_receiver, uid)
    assert before is not None and after is not None
    assert (after.status, after.updated_at, after.attributes_json) == (
        "COMPLETED", before.updated_at, before.attributes_json)


def test_n_set_on_an_unknown_instance_is_refused_as_no_such_instance(
        mpps_receiver: Receiver) -> None:
    status = send_mpps_set(HOST, mpps_receiver.port, AET, generate_uid(),
                           mpps_completed_dataset(_series()))
    assert status == MppsStatus.NO_SUCH_SOP_INSTANCE


def test_n_set_with_an_unknown_status_value_is_refused(mpps_receiver: Receiver) -> None:
    uid, _, _ = _create(mpps_receiver, generate_uid())
    bad = mpps_completed_dataset(_series())
    bad.PerformedProcedureStepStatus = "SCHEDULED"
    assert send_mpps_set(HOST, mpps_receiver.port, AET, uid, bad) == (
        MppsStatus.INVALID_ATTRIBUTE_VALUE)
    step = _step(mpps_receiver, uid)
    assert step is not None and step.status == "IN PROGRESS"


@pytest.mark.parametrize("remove", ["PerformedSeriesSequence", "PerformedProcedureStepEndDate"])
def test_n_set_completed_without_its_final_attributes_is_refused_as_missing_value(
        mpps_receiver: Receiver, remove: str) -> None:
    uid, _, _ = _create(mpps_receiver, generate_uid())
    final = mpps_completed_dataset(_series())
    setattr(final, remove, [] if remove.endswith("Sequence") else "")
    assert send_mpps_set(HOST, mpps_receiver.port, AET, uid, final) == (
        MppsStatus.MISSING_ATTRIBUTE_VALUE)
    step = _step(mpps_receiver, uid)
    assert step is not None and step.status == "IN PROGRESS"


def test_n_set_discontinued_stores_the_reason(mpps_receiver: Receiver) -> None:
    series = _series(1, 2)
    uid, _, updated = _create(mpps_receiver, generate_uid(), mpps_discontinued_dataset(series))
    assert updated == MppsStatus.SUCCESS
    step = _step(mpps_receiver, uid)
    assert step is not None
    assert (step.status, step.discontinuation_reason) == (
        "DISCONTINUED", "Incorrect worklist entry selected")
    assert len(json.loads(step.performed_series)) == 1


def test_n_set_discontinued_without_series_is_accepted(mpps_receiver: Receiver) -> None:
    uid, _, updated = _create(mpps_receiver, generate_uid(), mpps_discontinued_dataset())
    assert updated == MppsStatus.SUCCESS
    step = _step(mpps_receiver, uid)
    assert step is not None and step.status == "DISCONTINUED"
    assert json.loads(step.performed_series) == {}


def test_n_set_keeps_attributes_that_only_n_create_may_set(mpps_receiver: Receiver) -> None:
    study = generate_uid()
    uid, _, _ = _create(mpps_receiver, study)
    final = mpps_completed_dataset(_series())
    final.Modality = "MR"
    final.PatientID = "SOMEONE-ELSE"
    final.ScheduledStepAttributesSequence = mpps_create_dataset(
        generate_uid()).ScheduledStepAttributesSequence
    with capture_logs() as logs:
        assert send_mpps_set(HOST, mpps_receiver.port, AET, uid, final) == MppsStatus.SUCCESS
    step = _step(mpps_receiver, uid)
    assert step is not None and (step.status, step.modality) == ("COMPLETED", "CT")
    assert Dataset.from_json(step.attributes_json).PatientID == PATIENT_ID
    assert _studies(mpps_receiver, uid) == [study]
    (updated,) = [e for e in logs if e["event"] == "mpps_updated"]
    assert sorted(updated["ignored_attributes"]) == [
        "Modality", "PatientID", "ScheduledStepAttributesSequence"]


def test_n_set_without_character_set_is_read_in_the_character_set_of_its_n_create(
        mpps_receiver: Receiver) -> None:
    create = mpps_create_dataset(generate_uid(), patient_name="Müller^Jürgen",
                                 character_set="ISO_IR 100")
    final = mpps_completed_dataset(_series())
    # Latin-1 bytes, and no Specific Character Set in the N-SET (PS3.4 F.7.2.2.3)
    final.add_new(0x00400254, "LO", "Thorax Übersicht".encode("latin-1"))
    uid = generate_uid()
    created, updated = send_mpps(HOST, mpps_receiver.port, AET, create, final, mpps_uid=uid)
    assert (created, updated) == (MppsStatus.SUCCESS, MppsStatus.SUCCESS)
    step = _step(mpps_receiver, uid)
    assert step is not None
    stored = Dataset.from_json(step.attributes_json)
    assert stored.PatientName == "Müller^Jürgen"
    assert stored.PerformedProcedureStepDescription == "Thorax Übersicht"


# --- failures, configuration ------------------------------------------------------------------

def test_database_failure_answers_processing_failure_and_keeps_the_association(
        mpps_receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object) -> bool:
        raise RuntimeError(f"disk on fire while storing {PATIENT_NAME}")

    monkeypatch.setattr("dicom_node.mpps.scp.create_step", broken)
    uid = generate_uid()
    with capture_logs() as logs, mpps_association(HOST, mpps_receiver.port, AET) as assoc:
        status, _ = assoc.send_n_create(mpps_create_dataset(generate_uid()),
                                        ModalityPerformedProcedureStep, uid)
        assert status.Status == MppsStatus.PROCESSING_FAILURE
        monkeypatch.setattr("dicom_node.mpps.scp.create_step", mpps_store.create_step)
        status, _ = assoc.send_n_create(mpps_create_dataset(generate_uid()),
                                        ModalityPerformedProcedureStep, uid)
        assert status.Status == MppsStatus.SUCCESS  # same association, still serving
    (failed,) = [e for e in logs if e["event"] == "mpps_failed"]
    assert failed["mpps_uid"] == uid and failed["reason"].startswith("unexpected: RuntimeError")
    assert PATIENT_NAME not in str(failed)


def test_without_mpps_section_the_mpps_context_is_refused_and_storage_still_works(
        receiver: Receiver) -> None:
    ae = AE(ae_title="CT_SCANNER1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(HOST, receiver.port, ae_title=AET)
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assert ModalityPerformedProcedureStep in rejected
        assert ModalityPerformedProcedureStep not in accepted
        status = assoc.send_c_store(dcmread(sample_file("CT_small.dcm")))
        assert status.Status == StoreStatus.SUCCESS
    finally:
        assoc.release()


def test_mpps_section_with_enabled_false_keeps_the_context_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, "\n[mpps]\nenabled = false\n")
    rx = Receiver(config, make_engine(config.database.url))
    rx.start()
    try:
        ae = AE(ae_title="CT_SCANNER1")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate(HOST, rx.port, ae_title=AET)
        assert not assoc.is_established  # its only context was refused
    finally:
        rx.stop()


def test_turning_mpps_off_on_reload_needs_a_restart_and_the_scp_keeps_answering(
        mpps_receiver: Receiver) -> None:
    config = mpps_receiver.context.config
    with capture_logs() as logs:
        mpps_receiver.reconfigure(config.model_copy(update={"mpps": None}))
    assert any(e["event"] == "restart_required" and "[mpps]" in e["reason"] for e in logs)
    _, created, _ = _create(mpps_receiver, generate_uid())
    assert created == MppsStatus.SUCCESS


# --- queries for completion, listing ----------------------------------------------------------

def test_completion_queries_return_what_was_stored(mpps_receiver: Receiver) -> None:
    before = utcnow()
    completed_study, discontinued_study, running_study = (generate_uid() for _ in range(3))
    series = _series(2, 2)
    done_uid, _, _ = _create(mpps_receiver, completed_study, mpps_completed_dataset(series))
    stopped_uid, _, _ = _create(mpps_receiver, discontinued_study, mpps_discontinued_dataset())
    running_uid, _, _ = _create(mpps_receiver, running_study)
    with mpps_receiver.context.sessions() as session:
        (done,) = performed_steps_for_study(session, completed_study)
        assert done.sop_instance_uid == done_uid
        assert (done.status, done.modality) == ("COMPLETED", "CT")
        assert done.performed_series == {
            s: tuple(sop for _cls, sop in instances) for s, instances in series.items()}
        assert done.discontinuation_reason is None
        assert before <= done.created_at <= done.updated_at
        (stopped,) = performed_steps_for_study(session, discontinued_study)
        assert (stopped.status, stopped.discontinuation_reason) == (
            "DISCONTINUED", "Incorrect worklist entry selected")
        (running,) = performed_steps_for_study(session, running_study)
        assert (running.sop_instance_uid, running.status) == (running_uid, "IN PROGRESS")
        assert performed_steps_for_study(session, generate_uid()) == []
        assert studies_with_final_steps(session, before) == sorted(
            [completed_study, discontinued_study])
        assert studies_with_final_steps(session, utcnow() + timedelta(seconds=1)) == []
        listing = list_performed_steps(session, limit=2)
    assert [row["sop_instance_uid"] for row in listing] == [running_uid, stopped_uid]
    assert listing[1]["study_uids"] == [discontinued_study]
    assert (listing[1]["status"], listing[1]["series"], listing[1]["instances"]) == (
        "DISCONTINUED", 0, 0)
    assert not any(PATIENT_NAME in str(v) or PATIENT_ID in str(v)
                   for row in listing for v in row.values())


def test_mpps_log_events_never_show_patient_name_or_id(mpps_receiver: Receiver) -> None:
    with capture_logs() as logs:
        uid, _, _ = _create(mpps_receiver, generate_uid(), mpps_completed_dataset(_series()))
        send_mpps_set(HOST, mpps_receiver.port, AET, uid, mpps_discontinued_dataset())
        bad = mpps_create_dataset(generate_uid())
        bad.PerformedProcedureStepStatus = "COMPLETED"
        send_mpps(HOST, mpps_receiver.port, AET, bad)
    events = {e["event"] for e in logs}
    assert {"mpps_created", "mpps_updated", "mpps_refused"} <= events
    for event in logs:
        text = json.dumps(event, default=str)
        assert PATIENT_NAME not in text and "Testpatient" not in text
        assert PATIENT_ID not in text
