"""Matching studies to worklist orders (study UID → accession → patient + modality + date),
routing on order attributes, and the order written onto results."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from structlog.testing import capture_logs

from dicom_node.config import Config, parse_config
from dicom_node.encode.order import apply_order
from dicom_node.errors import ConfigError
from dicom_node.messages import StudySummary
from dicom_node.route import route_study
from dicom_node.store.db import Study, make_engine, make_sessionmaker
from dicom_node.worklist.match import match_study, order_for_study
from tests.support.dicom_tools import dciodvfy
from tests.support.order_data import add_step, add_study, worklist_item

BASE = {
    "worklist": {"ae_title": "RIS", "host": "127.0.0.1", "port": 2005},
    "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    "models": [{"name": "m", "path": "models/m"}],
}


def _config(tmp_path: Path, **extra: object) -> Config:
    raw = {**BASE, "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"}, **extra}
    config = parse_config(raw)
    sessions = make_sessionmaker(make_engine(config.database.url))
    with sessions() as session:
        known = session.get(Study, "1.2.3") is not None
    if not known:
        add_study(sessions, "1.2.3")
    return config


def _summary(study_uid: str = "1.2.3", *, accession: str = "", patient: str = "PAT-1",
             modality: str = "CT", date: str = "20261121") -> StudySummary:
    values = {"Modality": frozenset({modality}), "PatientID": frozenset({patient}),
              "StudyDate": frozenset({date})}
    if accession:
        values["AccessionNumber"] = frozenset({accession})
    return StudySummary(study_instance_uid=study_uid, values=values, instance_count=1,
                        series_count=1)


def test_study_uid_match_wins_over_accession_and_patient(tmp_path: Path) -> None:
    config = _config(tmp_path)
    sessions = make_sessionmaker(make_engine(config.database.url))
    add_step(sessions, worklist_item(accession="ACC-OTHER", study_uid="1.2.3", rp_id="RP-A"))
    add_step(sessions, worklist_item(accession="ACC-1", rp_id="RP-B"))
    with sessions() as session:
        order = match_study(session, config, _summary(accession="ACC-1"))
        session.commit()
    assert order is not None
    assert (order.method, order.accession_number) == ("study_uid", "ACC-OTHER")
    with sessions() as session:
        kept = order_for_study(session, "1.2.3")
    assert kept is not None and kept.method == "study_uid"


def test_accession_match_when_the_modality_made_its_own_study_uid(tmp_path: Path) -> None:
    config = _config(tmp_path)
    sessions = make_sessionmaker(make_engine(config.database.url))
    add_step(sessions, worklist_item(accession="ACC-1", study_uid="9.9.9"))
    with sessions() as session:
        order = match_study(session, config, _summary(accession="ACC-1"))
    assert order is not None and order.method == "accession"
    assert order.route_values()["RequestedProcedureCode"] == frozenset({"CTCHEST"})


def test_patient_modality_date_match_respects_the_date_window(tmp_path: Path) -> None:
    config = _config(tmp_path)
    sessions = make_sessionmaker(make_engine(config.database.url))
    add_step(sessions, worklist_item(accession="ACC-1", start="20261120"))
    with sessions() as session:
        assert match_study(session, config, _summary()) is None  # a day off, match_days = 0
    wide = _config(tmp_path, worklist={**BASE["worklist"], "match_days": 1})  # type: ignore[dict-item]
    with sessions() as session:
        order = match_study(session, wide, _summary())
        assert match_study(session, wide, _summary(modality="MR")) is None
        assert match_study(session, wide, _summary(patient="PAT-2")) is None
    assert order is not None and order.method == "patient_modality_date"


def test_two_requests_for_one_patient_and_day_leave_the_study_unmatched(tmp_path: Path) -> None:
    config = _config(tmp_path)
    sessions = make_sessionmaker(make_engine(config.database.url))
    add_step(sessions, worklist_item(accession="ACC-1"))
    add_step(sessions, worklist_item(accession="ACC-2", rp_id="RP-2"))
    with capture_logs() as logs, sessions() as session:
        assert match_study(session, config, _summary()) is None
    (event,) = [e for e in logs if e["event"] == "order_ambiguous"]
    assert event["candidates"] == 2 and "PAT-1" not in str(event)


def test_several_steps_of_one_request_pick_the_study_modality(tmp_path: Path) -> None:
    config = _config(tmp_path)
    sessions = make_sessionmaker(make_engine(config.database.url))
    add_step(sessions, worklist_item(accession="ACC-1", modality="MR", sps_id="S-MR"))
    add_step(sessions, worklist_item(accession="ACC-1", modality="CT", sps_id="S-CT",
                                     start="20261122"))
    with sessions() as session:
        order = match_study(session, config, _summary(accession="ACC-1"))
    assert order is not None and order.scheduled_procedure_step_id == "S-CT"


def test_without_a_worklist_section_nothing_is_matched(tmp_path: Path) -> None:
    raw = {k: v for k, v in BASE.items() if k != "worklist"}
    config = parse_config({**raw, "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"}})
    sessions = make_sessionmaker(make_engine(config.database.url))
    add_step(sessions, worklist_item(study_uid="1.2.3"))
    with sessions() as session:
        assert match_study(session, config, _summary()) is None


def _routes(tmp_path: Path) -> Config:
    return _config(tmp_path, routes=[
        {"name": "chest by order", "match": {"Modality": "CT"},
         "order": {"RequestedProcedureCode": "CTCHEST",
                   "ScheduledStationAETitle": {"regex": "^CT"}},
         "models": ["m"], "send_to": ["pacs"]},
        {"name": "any CT", "match": {"Modality": "CT"}, "models": ["m"], "send_to": ["pacs"]},
    ])


def test_a_route_fires_on_the_order_procedure_code(tmp_path: Path) -> None:
    config = _routes(tmp_path)
    sessions = make_sessionmaker(make_engine(config.database.url))
    add_step(sessions, worklist_item(accession="ACC-1"))
    with sessions() as session:
        order = match_study(session, config, _summary(accession="ACC-1"))
    by_order, any_ct = route_study(_summary(accession="ACC-1"), config.routes, order)
    assert by_order.fires and any_ct.fires
    assert "order.RequestedProcedureCode: 'CTCHEST' matches 'CTCHEST'" in by_order.reasons


def test_an_order_route_does_not_fire_without_an_order_or_on_another_code(
        tmp_path: Path) -> None:
    config = _routes(tmp_path)
    sessions = make_sessionmaker(make_engine(config.database.url))
    by_order, any_ct = route_study(_summary(), config.routes, None)
    assert not by_order.fires and any_ct.fires
    assert "order: no worklist order is matched to the study" in by_order.reasons
    add_step(sessions, worklist_item(accession="ACC-9", procedure_code="CTHEAD"))
    with sessions() as session:
        order = match_study(session, config, _summary(accession="ACC-9"))
    assert not route_study(_summary(accession="ACC-9"), config.routes, order)[0].fires


def test_order_keys_are_checked_and_need_a_worklist(tmp_path: Path) -> None:
    route = {"name": "r", "order": {"ProcedureCode": "X"}, "models": ["m"], "send_to": ["pacs"]}
    with pytest.raises(ConfigError, match="'ProcedureCode' is not a worklist order key"):
        _config(tmp_path, routes=[route])
    raw = {k: v for k, v in BASE.items() if k != "worklist"}
    route["order"] = {"RequestedProcedureCode": "X"}
    with pytest.raises(ConfigError, match=r"routes\[0\]\.order: .*no \[worklist\] section"):
        parse_config({**raw, "routes": [route]})


def test_results_carry_the_accession_and_the_request(tmp_path: Path) -> None:
    config = _config(tmp_path)
    sessions = make_sessionmaker(make_engine(config.database.url))
    add_step(sessions, worklist_item(accession="ACC-7", study_uid="1.2.3"))
    with sessions() as session:
        order = match_study(session, config, _summary())
    assert order is not None
    sr, seg = Dataset(), Dataset()
    sr.Modality, seg.Modality = "SR", "SEG"
    sr.AccessionNumber = seg.AccessionNumber = ""
    apply_order(sr, order, "1.2.3")
    apply_order(seg, order, "1.2.3")
    (request,) = sr.ReferencedRequestSequence
    assert sr.AccessionNumber == seg.AccessionNumber == "ACC-7"
    assert (request.StudyInstanceUID, request.AccessionNumber, request.RequestedProcedureID,
            request.PlacerOrderNumberImagingServiceRequest) == ("1.2.3", "ACC-7", "RP-1",
                                                                 "PL-ACC-7")
    assert request.RequestedProcedureCodeSequence[0].CodeValue == "CTCHEST"
    (attributes,) = seg.RequestAttributesSequence
    assert (attributes.RequestedProcedureID, attributes.ScheduledProcedureStepID) == ("RP-1",
                                                                                       "SPS-1")
    assert "ReferencedRequestSequence" not in seg


def test_seg_sr_and_derived_images_with_the_order_stay_valid_dicom(tmp_path: Path) -> None:
    """The order attributes are written where each IOD has them: dciodvfy finds no error."""
    from tests.test_encode_derived import build, read
    from tests.test_encode_seg import build_both, single_frames, write

    config = _config(tmp_path)
    sessions = make_sessionmaker(make_engine(config.database.url))
    add_step(sessions, worklist_item(accession="ACC-7", study_uid="1.2.3"))
    with sessions() as session:
        order = match_study(session, config, _summary())
    assert order is not None
    seg, sr = build_both(*single_frames())
    (derived, *_) = build(read("CT_small.dcm"))
    for name, dataset in (("seg", seg), ("sr", sr), ("derived", derived)):
        apply_order(dataset, order, str(dataset.StudyInstanceUID))
        report = dciodvfy(write(dataset, tmp_path / f"{name}.dcm"))
        assert report.errors == (), f"{name}: {report.output}"
        assert dataset.AccessionNumber == "ACC-7"
    assert "ReferencedRequestSequence" in sr and "RequestAttributesSequence" in seg
    assert derived.RequestAttributesSequence[0].RequestedProcedureID == "RP-1"
