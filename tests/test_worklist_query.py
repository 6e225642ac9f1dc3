"""The Modality Worklist query side: C-FIND against DCMTK's wlmscpfs, the scheduled steps kept in
the database, outages, the scheduled poll and ``dicom-node worklist`` (docs/worklist.md)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, MutableMapping
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from dicom_node import complete
from dicom_node.config import Config, WorklistSection, load_config
from dicom_node.errors import WorklistError
from dicom_node.scheduler import ReceiverScheduler
from dicom_node.store.db import ScheduledStep, make_engine, make_sessionmaker
from dicom_node.worklist.order import item_from_json, step_key
from dicom_node.worklist.query import query_worklist
from dicom_node.worklist.refresh import WorklistPoller, refresh
from tests.conftest import sample_file
from tests.support.peers import NodeProcess, dcmtk, free_port, to_toml, wait_until
from tests.support.worklist_peer import WorklistSCP

T0 = datetime(2030, 3, 4, 8, 0, 0)
TODAY = date.today()


def _config(folder: Path, worklist: dict[str, Any] | None) -> Config:
    document: dict[str, Any] = {
        "node": {"ae_title": "DICOM_NODE", "port": free_port(), "bind": "127.0.0.1",
                 "data_dir": "var"},
    }
    if worklist is not None:
        document["worklist"] = worklist
    path = folder / "config.toml"
    path.write_text(to_toml(document), encoding="utf-8")
    return load_config(path)


def _sessions(config: Config) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(config.database.url))


def _section(scp: WorklistSCP, **overrides: Any) -> WorklistSection:
    return WorklistSection.model_validate(scp.section(**overrides))


def _steps(sessions: sessionmaker[Session]) -> list[ScheduledStep]:
    with sessions() as session:
        return list(session.scalars(select(ScheduledStep).order_by(ScheduledStep.key)))


def _accessions(items: list[Dataset]) -> list[str]:
    return sorted(str(item.AccessionNumber) for item in items)


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --------------------------------------------------------------------------------------------
# the query


def test_query_returns_order_keys_and_patient_id_but_never_the_patient_name(
        worklist_scp: WorklistSCP) -> None:
    worklist_scp.add("chest", accession="ACC100", patient_id="PID100", station_ae="CT01")

    [item] = query_worklist(_section(worklist_scp), "DICOM_NODE")

    assert "PatientName" not in item
    assert item.PatientID == "PID100"
    assert item.AccessionNumber == "ACC100"
    assert item.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.7001"
    assert item.RequestedProcedureID == "RP0001"
    assert item.RequestedProcedureDescription == "CT CHEST"
    assert item.RequestedProcedureCodeSequence[0].CodeValue == "CTCHEST"
    assert item.PlacerOrderNumberImagingServiceRequest == "PLACER0001"
    assert item.FillerOrderNumberImagingServiceRequest == "FILLER0001"
    step = item.ScheduledProcedureStepSequence[0]
    assert (step.Modality, step.ScheduledStationAETitle, step.ScheduledStationName) == (
        "CT", "CT01", "CTROOM1")
    assert step.ScheduledProcedureStepStartDate == f"{TODAY:%Y%m%d}"
    assert (step.ScheduledProcedureStepID, step.ScheduledProcedureStepDescription) == (
        "SPS0001", "Chest CT")
    assert step.ScheduledProtocolCodeSequence[0].CodeValue == "PROT1"


def test_filter_narrows_by_modality_station_ae_and_start_date_range(
        worklist_scp: WorklistSCP) -> None:
    worklist_scp.add("ct-today", accession="CT_TODAY", study_uid="1.2.3.1")
    worklist_scp.add("mr-today", accession="MR_TODAY", study_uid="1.2.3.2", modality="MR",
                     station_ae="MR01")
    worklist_scp.add("ct-other-room", accession="CT_ROOM2", study_uid="1.2.3.3",
                     station_ae="CT02")
    worklist_scp.add("ct-last-week", accession="CT_PAST", study_uid="1.2.3.4",
                     day=TODAY - timedelta(days=7))
    worklist_scp.add("ct-in-3-days", accession="CT_FUTURE", study_uid="1.2.3.5",
                     day=TODAY + timedelta(days=3))

    everything_near = query_worklist(_section(worklist_scp), "DICOM_NODE")
    ct_room1 = query_worklist(_section(worklist_scp, filter={
        "modality": "CT", "scheduled_station_ae_title": "CT01"}), "DICOM_NODE")
    wider = query_worklist(_section(worklist_scp, filter={
        "modality": "CT", "days_before": 7, "days_after": 3}), "DICOM_NODE")
    only_mr = query_worklist(_section(worklist_scp, filter={"modality": "MR"}), "DICOM_NODE")

    assert _accessions(everything_near) == ["CT_ROOM2", "CT_TODAY", "MR_TODAY"]
    assert _accessions(ct_room1) == ["CT_TODAY"]
    assert _accessions(wider) == ["CT_FUTURE", "CT_PAST", "CT_ROOM2", "CT_TODAY"]
    assert _accessions(only_mr) == ["MR_TODAY"]


def test_station_name_filter_applies_although_wlmscpfs_does_not_match_on_it(
        worklist_scp: WorklistSCP) -> None:
    worklist_scp.add("room1", accession="ROOM1", study_uid="1.2.3.1", station_name="CTROOM1")
    worklist_scp.add("room2", accession="ROOM2", study_uid="1.2.3.2", station_name="CTROOM2")

    items = query_worklist(_section(worklist_scp, filter={"scheduled_station_name": "CTROOM2"}),
                           "DICOM_NODE")

    assert _accessions(items) == ["ROOM2"]


def test_failure_status_raises_worklist_error_with_the_status_in_hex(
        worklist_scp: WorklistSCP) -> None:
    worklist_scp.add("chest")
    worklist_scp.set_lockfile(False)  # wlmscpfs then answers 0xA700 Out of Resources

    with pytest.raises(WorklistError, match=r"WLSCP@127\.0\.0\.1:\d+: C-FIND failed with "
                                            r"status 0xA700 \(Failure: Refused: Out of "):
        query_worklist(_section(worklist_scp), "DICOM_NODE")


def test_unknown_called_ae_title_is_reported_as_a_rejected_association(
        worklist_scp: WorklistSCP) -> None:
    with pytest.raises(WorklistError, match=r"NOSUCHAE@127\.0\.0\.1:\d+: association rejected "
                                            r"\(.*Called AE title not recognised\)"):
        query_worklist(_section(worklist_scp, ae_title="NOSUCHAE"), "DICOM_NODE")


def test_refused_connection_raises_worklist_error_naming_host_and_port(
        worklist_scp: WorklistSCP) -> None:
    worklist_scp.stop()

    with pytest.raises(WorklistError) as raised:
        query_worklist(_section(worklist_scp), "DICOM_NODE")

    assert f"WLSCP@127.0.0.1:{worklist_scp.port}: cannot connect: " in str(raised.value)
    assert "Connection refused" in raised.value.reason


def test_host_name_that_does_not_resolve_raises_worklist_error(
        worklist_scp: WorklistSCP) -> None:
    with pytest.raises(WorklistError, match=r"WLSCP@ris\.invalid:\d+: cannot connect: "):
        query_worklist(_section(worklist_scp, host="ris.invalid"), "DICOM_NODE")


def test_slow_worklist_fails_after_timeout_seconds(tmp_path: Path) -> None:
    with WorklistSCP(tmp_path / "slow", extra_args=("--sleep-before", "5")) as slow:
        slow.add("chest")
        started = time.monotonic()
        with pytest.raises(WorklistError, match=r"no C-FIND response within 0\.5 s"):
            query_worklist(_section(slow, timeout_seconds=0.5), "DICOM_NODE")
        assert time.monotonic() - started < 3.0


# --------------------------------------------------------------------------------------------
# storing


def test_refresh_stores_each_step_with_its_indexed_columns(worklist_scp: WorklistSCP,
                                                           tmp_path: Path) -> None:
    worklist_scp.add("chest", accession="ACC1", study_uid="1.2.3.1", patient_id="PID1",
                     station_ae="CT01", time="101500")
    worklist_scp.add("knee", accession="ACC2", study_uid="1.2.3.2", patient_id="PID2",
                     modality="MR", station_ae="MR01", sps_id="SPS9")
    config = _config(tmp_path, worklist_scp.section())
    sessions = _sessions(config)

    counts = refresh(config, sessions, now=T0)

    assert (counts.fetched, counts.new, counts.updated, counts.pruned) == (2, 2, 0, 0)
    chest, knee = _steps(sessions)
    assert chest.key == "1.2.3.1|RP0001|SPS0001"
    assert (chest.study_instance_uid, chest.accession_number, chest.patient_id, chest.modality,
            chest.scheduled_station_ae_title) == ("1.2.3.1", "ACC1", "PID1", "CT", "CT01")
    assert chest.scheduled_start == datetime.combine(TODAY, datetime.min.time()).replace(
        hour=10, minute=15)
    assert chest.first_seen_at == chest.last_seen_at == T0
    assert (knee.key, knee.modality, knee.scheduled_station_ae_title) == (
        "1.2.3.2|RP0001|SPS9", "MR", "MR01")
    item = item_from_json(chest.item_json)
    assert step_key(item) == chest.key
    assert item.RequestedProcedureCodeSequence[0].CodeMeaning == "CT of the chest"
    assert "PatientName" not in item


def test_second_refresh_updates_the_step_instead_of_duplicating_it(worklist_scp: WorklistSCP,
                                                                   tmp_path: Path) -> None:
    worklist_scp.add("chest", sps_description="Chest CT")
    config = _config(tmp_path, worklist_scp.section())
    sessions = _sessions(config)
    refresh(config, sessions, now=T0)
    worklist_scp.add("chest", sps_description="Chest CT with contrast", time="143000")

    counts = refresh(config, sessions, now=T0 + timedelta(minutes=1))

    assert (counts.fetched, counts.new, counts.updated) == (1, 0, 1)
    [step] = _steps(sessions)
    assert step.first_seen_at == T0
    assert step.last_seen_at == T0 + timedelta(minutes=1)
    assert step.scheduled_start is not None and step.scheduled_start.hour == 14
    sps = item_from_json(step.item_json).ScheduledProcedureStepSequence[0]
    assert sps.ScheduledProcedureStepDescription == "Chest CT with contrast"


def test_step_not_returned_for_longer_than_keep_days_is_pruned(worklist_scp: WorklistSCP,
                                                               tmp_path: Path) -> None:
    worklist_scp.add("stays", accession="STAYS", study_uid="1.2.3.1")
    worklist_scp.add("goes", accession="GOES", study_uid="1.2.3.2")
    config = _config(tmp_path, worklist_scp.section(keep_days=7))
    sessions = _sessions(config)
    refresh(config, sessions, now=T0)
    worklist_scp.remove_item("goes")

    within = refresh(config, sessions, now=T0 + timedelta(days=6))
    kept = [s.accession_number for s in _steps(sessions)]
    beyond = refresh(config, sessions, now=T0 + timedelta(days=7, seconds=1))

    assert (within.fetched, within.pruned) == (1, 0)
    assert kept == ["STAYS", "GOES"]
    assert (beyond.fetched, beyond.updated, beyond.pruned) == (1, 1, 1)
    assert [s.accession_number for s in _steps(sessions)] == ["STAYS"]


# --------------------------------------------------------------------------------------------
# outages


def test_outage_is_logged_once_then_restored_with_the_items_stored(worklist_scp: WorklistSCP,
                                                                   tmp_path: Path) -> None:
    worklist_scp.add("chest", accession="ACC7", patient_id="PID7777")
    config = _config(tmp_path, worklist_scp.section())
    sessions = _sessions(config)
    poller = WorklistPoller(sessions, complete.catch_up)
    worklist_scp.stop()

    with capture_logs() as logs:
        failed = [poller.poll(config, now=T0 + timedelta(minutes=i)) for i in range(3)]
        worklist_scp.start()
        back = poller.poll(config, now=T0 + timedelta(minutes=3))

    assert [o.ok for o in failed] == [False, False, False]
    assert all("Connection refused" in (o.error or "") for o in failed)
    [down] = _events(logs, "worklist_unreachable")
    assert down["log_level"] == "warning"
    assert (down["host"], down["port"], down["ae_title"]) == (
        "127.0.0.1", worklist_scp.port, "WLSCP")
    assert "Connection refused" in down["reason"]
    assert [e["log_level"] for e in _events(logs, "worklist_still_unreachable")] == [
        "debug", "debug"]
    [restored] = _events(logs, "worklist_restored")
    assert (restored["failed_polls"], restored["outage_seconds"]) == (3, 180.0)
    assert back.ok and back.restored and back.counts is not None and back.counts.new == 1
    assert [s.accession_number for s in _steps(sessions)] == ["ACC7"]
    [caught_up] = _events(logs, "worklist_catch_up")
    assert caught_up["matched"] == back.caught_up == 0
    assert caught_up["since"] == T0.isoformat()
    assert "PID7777" not in repr(logs)


def test_second_outage_is_logged_again_and_polls_between_stay_quiet(
        worklist_scp: WorklistSCP, tmp_path: Path) -> None:
    config = _config(tmp_path, worklist_scp.section())
    poller = WorklistPoller(_sessions(config), complete.catch_up)

    with capture_logs() as logs:
        poller.poll(config, now=T0)
        worklist_scp.stop()
        poller.poll(config, now=T0 + timedelta(minutes=1))
        worklist_scp.start()
        poller.poll(config, now=T0 + timedelta(minutes=2))
        poller.poll(config, now=T0 + timedelta(minutes=3))
        worklist_scp.set_lockfile(False)
        outcome = poller.poll(config, now=T0 + timedelta(minutes=4))

    assert [e["event"] for e in logs if e["event"].startswith("worklist_")] == [
        "worklist_refreshed", "worklist_unreachable", "worklist_refreshed", "worklist_restored",
        "worklist_catch_up", "worklist_refreshed", "worklist_unreachable"]
    assert _events(logs, "worklist_catch_up")[0]["since"] == T0.isoformat()
    assert outcome.error is not None and "0xA700" in outcome.error


def test_poll_does_not_raise_when_the_database_fails(worklist_scp: WorklistSCP,
                                                     tmp_path: Path) -> None:
    worklist_scp.add("chest")
    config = _config(tmp_path, worklist_scp.section())
    engine = make_engine(config.database.url)
    ScheduledStep.__table__.drop(engine)  # type: ignore[attr-defined]
    poller = WorklistPoller(make_sessionmaker(engine), complete.catch_up)

    with capture_logs() as logs:
        outcome = poller.poll(config)

    assert not outcome.ok and outcome.error is not None
    assert [e["log_level"] for e in _events(logs, "worklist_poll_failed")] == ["error"]
    assert not poller.in_outage  # the worklist answered; the fault was ours


def test_catch_up_failure_after_an_outage_is_logged_not_raised(
        worklist_scp: WorklistSCP, tmp_path: Path) -> None:
    worklist_scp.add("chest")
    config = _config(tmp_path, worklist_scp.section())

    def failing_catch_up(*_args: Any, **_kwargs: Any) -> int:
        raise RuntimeError("the matcher broke")

    poller = WorklistPoller(_sessions(config), failing_catch_up)
    worklist_scp.stop()
    poller.poll(config, now=T0)
    worklist_scp.start()
    with capture_logs() as logs:
        outcome = poller.poll(config, now=T0 + timedelta(minutes=1))

    assert outcome.ok and outcome.restored and outcome.caught_up is None
    assert [e["log_level"] for e in _events(logs, "worklist_catch_up_failed")] == ["error"]


# --------------------------------------------------------------------------------------------
# the scheduled poll


def test_scheduler_polls_at_start_and_follows_the_worklist_section(worklist_scp: WorklistSCP,
                                                                   tmp_path: Path) -> None:
    worklist_scp.add("chest", accession="FIRST", study_uid="1.2.3.1")
    with_worklist = _config(tmp_path, worklist_scp.section(poll_seconds=3600))
    without = _config(tmp_path, None)
    sessions = _sessions(with_worklist)
    scheduler = ReceiverScheduler(with_worklist, sessions)
    assert scheduler.worklist_poll_seconds() == 3600
    scheduler.start()
    try:
        wait_until(lambda: len(_steps(sessions)) == 1, 10, "the poll at start")
        scheduler.reconfigure(without)
        assert scheduler.worklist_poll_seconds() is None
        worklist_scp.add("knee", accession="SECOND", study_uid="1.2.3.2")
        scheduler.reconfigure(with_worklist)
        wait_until(lambda: len(_steps(sessions)) == 2, 10, "the poll of a re-added section")
        worklist_scp.add("hand", accession="THIRD", study_uid="1.2.3.3")
        scheduler.reconfigure(_config(tmp_path, worklist_scp.section(poll_seconds=1800)))
        assert scheduler.worklist_poll_seconds() == 1800
        wait_until(lambda: len(_steps(sessions)) == 3, 10, "the poll of a changed section")
    finally:
        scheduler.stop()


def test_receiver_keeps_receiving_through_a_worklist_outage_and_logs_it_once(
        worklist_scp: WorklistSCP, node_factory: Callable[..., NodeProcess]) -> None:
    worklist_scp.add("chest", accession="E2E1")
    node = node_factory(sections={"worklist": worklist_scp.section(
        poll_seconds=0.3)})
    node.wait_for_log("worklist_refreshed")
    worklist_scp.stop()
    node.wait_for_log("worklist_unreachable")

    sent = dcmtk("storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port),
                 sample_file("CT_small.dcm"))
    node.wait_for_log("study_unrouted")
    worklist_scp.start()
    node.wait_for_log("worklist_catch_up")

    assert sent.returncode == 0, sent.stderr
    assert len(node.find_logs("worklist_unreachable")) == 1
    [restored] = node.find_logs("worklist_restored")
    assert restored["failed_polls"] >= 2
    assert not [e for e in node.logs() if e.get("level") == "error"]


# --------------------------------------------------------------------------------------------
# dicom-node worklist


def _node(tmp_path: Path, worklist: dict[str, Any] | None) -> NodeProcess:
    return NodeProcess(tmp_path / "node", sections={"worklist": worklist} if worklist else None)


def test_worklist_command_prints_the_steps_without_patient_data(worklist_scp: WorklistSCP,
                                                                tmp_path: Path) -> None:
    worklist_scp.add("chest", accession="ACC555", patient_id="PID5555",
                     patient_name="SECRET^NAME", station_ae="CT01", time="101500")
    node = _node(tmp_path, worklist_scp.section())

    done = node.cli("worklist")
    worklist_scp.stop()
    stored = node.cli("worklist", "--stored", "--json")

    assert done.returncode == 0, done.stderr
    assert f"WLSCP@127.0.0.1:{worklist_scp.port}: fetched 1 (new 1, updated 0, pruned 0)" in (
        done.stdout)
    [header, row] = done.stdout.splitlines()[1:3]
    assert header.split()[:4] == ["SCHEDULED_START", "MODALITY", "STATION_AE_TITLE",
                                  "STATION_NAME"]
    assert row.split() == [f"{TODAY:%Y-%m-%d}", "10:15", "CT", "CT01", "CTROOM1", "ACC555",
                           "CTCHEST", "CT", "CHEST", "SPS0001", "Chest", "CT"]
    assert "1 scheduled step(s) stored" in done.stdout
    for secret in ("PID5555", "SECRET"):
        assert secret not in done.stdout + done.stderr + stored.stdout
    assert stored.returncode == 0, stored.stderr
    answer = json.loads(stored.stdout)
    assert answer["refreshed"] is None
    assert [s["accession_number"] for s in answer["steps"]] == ["ACC555"]


def test_worklist_command_exits_1_naming_host_and_port_when_the_worklist_is_down(
        worklist_scp: WorklistSCP, tmp_path: Path) -> None:
    worklist_scp.stop()
    node = _node(tmp_path, worklist_scp.section())

    done = node.cli("worklist")

    assert done.returncode == 1
    assert done.stderr.startswith(f"error: Modality Worklist WLSCP@127.0.0.1:{worklist_scp.port}:"
                                  f" cannot connect: ")


def test_worklist_command_without_a_worklist_section_exits_2(tmp_path: Path) -> None:
    node = _node(tmp_path, None)

    done = node.cli("worklist")

    assert done.returncode == 2
    assert "no [worklist] section" in done.stderr


def test_doctor_queries_the_worklist_and_names_it_when_it_is_down(worklist_scp: WorklistSCP,
                                                                  tmp_path: Path) -> None:
    from dicom_node.doctor import check_worklist

    worklist_scp.add("one", accession="ACC-DOC")
    config = _config(tmp_path, worklist_scp.section())
    check = check_worklist(config)
    assert check is not None and (check.name, check.status) == ("worklist", "ok")
    assert "1 scheduled step(s)" in check.detail
    worklist_scp.stop()
    check = check_worklist(config)
    assert check is not None and check.status == "FAIL"
    assert f"127.0.0.1:{worklist_scp.port}" in check.detail
    (tmp_path / "none").mkdir()
    assert check_worklist(_config(tmp_path / "none", None)) is None
