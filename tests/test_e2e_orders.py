"""Order awareness with real peers: DCMTK's wlmscpfs as the RIS worklist, a pynetdicom modality
sending MPPS, storescu sending images, Orthanc as the PACS.

- A study whose accession matches a worklist item is routed by the item's procedure code, and
  the SR that lands in Orthanc carries the accession and the Referenced Request Sequence.
- An MPPS COMPLETED makes a study complete within seconds although stable_after_seconds = 300.
- A series the MPPS lists that never arrives holds the study as incomplete; it completes when the
  series arrives.
- With the worklist down the node still receives and routes by image tags, logs the outage once,
  and catches up when the worklist returns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, generate_uid

from tests.conftest import sample_file
from tests.support.chest_pacs import CHEST_MODEL, pacs_with_node, wait_for_the_sr
from tests.support.dicom_tools import dciodvfy
from tests.support.mpps_scu import (
    mpps_completed_dataset,
    mpps_create_dataset,
    send_mpps,
    send_mpps_set,
)
from tests.support.order_data import write_instance
from tests.support.peers import NodeProcess, OrthancServer, dcmtk
from tests.support.worklist_peer import WorklistSCP

ACCESSION = "ACC-E2E-0001"
ORDER_ROUTE = {"name": "chest x-ray orders", "match": {"Modality": ["CR", "DX"]},
               "order": {"RequestedProcedureCode": "XRCHEST"},
               "models": ["chest-xray-cnn"], "send_to": ["pacs"]}
OTHER_ORDER_ROUTE = {"name": "rib series orders", "match": {"Modality": ["CR", "DX"]},
                     "order": {"RequestedProcedureCode": "XRRIBS"},
                     "models": ["chest-xray-cnn"], "send_to": ["pacs"]}


@pytest.mark.slow
def test_a_study_matched_by_accession_is_routed_by_procedure_code_and_its_sr_carries_the_order(
        orthanc_factory: Callable[..., OrthancServer],
        node_factory: Callable[..., NodeProcess], worklist_scp: WorklistSCP,
        tmp_path: Path) -> None:
    chest = dcmread(sample_file("RG1_UNCR.dcm"))
    chest.AccessionNumber = ACCESSION
    source = tmp_path / "chest.dcm"
    chest.save_as(source)
    # The RIS scheduled the exam under another Study Instance UID (the modality made its own):
    # only the accession links them.
    worklist_scp.add("chest", accession=ACCESSION, modality="CR", patient_id=str(chest.PatientID),
                     study_uid=generate_uid(), procedure_code="XRCHEST",
                     procedure_meaning="XR chest 2 views", requested_procedure_id="RP-77")
    worklist_scp.add("other", accession="ACC-OTHER", modality="CR", patient_id="SOMEONE-ELSE",
                     study_uid=generate_uid(), procedure_code="XRRIBS", sps_id="SPS0002")
    pacs, node = pacs_with_node(orthanc_factory, node_factory,
                                routes=[ORDER_ROUTE, OTHER_ORDER_ROUTE],
                                models=[CHEST_MODEL],
                                sections={"worklist": worklist_scp.section(poll_seconds=2)})
    node.wait_for_log("worklist_refreshed", timeout=30)

    sent = dcmtk("storescu", "-aec", pacs.ae_title, "127.0.0.1", str(pacs.dicom_port), source)
    assert sent.returncode == 0, sent.stderr
    sr_path = tmp_path / "result.dcm"
    sr = wait_for_the_sr(pacs, chest.StudyInstanceUID, sr_path)
    assert sr.AccessionNumber == ACCESSION
    (request,) = sr.ReferencedRequestSequence
    assert (request.AccessionNumber, request.RequestedProcedureID) == (ACCESSION, "RP-77")
    assert request.RequestedProcedureCodeSequence[0].CodeValue == "XRCHEST"
    assert request.PlacerOrderNumberImagingServiceRequest == "PLACER0001"
    report = dciodvfy(sr_path)
    assert report.errors == (), report.output

    (job,) = node.jobs()
    assert (job["route"], job["order"], job["state"]) == ("chest x-ray orders",
                                                          f"accession {ACCESSION}", "done")
    matched = node.wait_for_log("order_matched", study_uid=chest.StudyInstanceUID)
    assert matched["rule"] == "accession"
    routed = node.find_logs("study_routed", study_uid=chest.StudyInstanceUID)
    assert [r["route"] for r in routed] == ["chest x-ray orders"]
    logs = node.log_text() + "".join(p.read_text() for p in node.workdir.glob("*.log"))
    assert str(chest.PatientID) not in logs and str(chest.PatientName) not in logs


def _ct_series(folder: Path, study_uid: str, count: int) -> tuple[str, list[Path]]:
    series_uid = generate_uid()
    paths = [write_instance(folder, study_uid=study_uid, series_uid=series_uid,
                            sop_uid=generate_uid()) for _ in range(count)]
    return series_uid, paths


def _listing(paths: list[Path]) -> list[tuple[str, str]]:
    return [(CTImageStorage, str(dcmread(p, stop_before_pixels=True).SOPInstanceUID))
            for p in paths]


def _mpps_node(node_factory: Callable[..., NodeProcess], stable: float) -> NodeProcess:
    return node_factory("receive", stable_after_seconds=stable, models=[CHEST_MODEL],
                        routes=[{"name": "ct", "match": {"Modality": "CT"},
                                 "models": ["chest-xray-cnn"], "send_to": ["pacs"]}],
                        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                       "port": 104}],
                        sections={"mpps": {"enabled": True}})


@pytest.mark.slow
def test_mpps_completed_makes_a_study_complete_within_seconds_despite_a_300_s_timer(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = _mpps_node(node_factory, stable=300)
    study_uid, mpps_uid = generate_uid(), generate_uid()
    series_uid, paths = _ct_series(tmp_path / "ct", study_uid, 5)
    created, _ = send_mpps("127.0.0.1", node.port, node.ae_title,
                           mpps_create_dataset(study_uid), mpps_uid=mpps_uid)
    assert created == 0
    sent = dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), *paths)
    assert sent.returncode == 0, sent.stderr
    started = time.monotonic()
    assert send_mpps_set("127.0.0.1", node.port, node.ae_title, mpps_uid,
                         mpps_completed_dataset({series_uid: _listing(paths)})) == 0
    done = node.wait_for_log("study_completed", timeout=20, study_uid=study_uid)
    elapsed = time.monotonic() - started
    assert done["policy"] == "mpps" and done["instances"] == 5
    assert elapsed < 10, f"completed {elapsed:.1f} s after the N-SET"
    (study,) = node.studies()
    assert study["state"] == "routed"
    listed = node.cli("mpps", "--json", check=True)
    (step,) = json.loads(listed.stdout)
    assert (step["sop_instance_uid"], step["status"], step["instances"]) == (mpps_uid,
                                                                           "COMPLETED", 5)


@pytest.mark.slow
def test_a_series_the_mpps_lists_that_never_arrives_holds_the_study_until_it_does(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = _mpps_node(node_factory, stable=2)
    study_uid, mpps_uid = generate_uid(), generate_uid()
    first_uid, first = _ct_series(tmp_path / "a", study_uid, 3)
    second_uid, second = _ct_series(tmp_path / "b", study_uid, 2)
    listing = {first_uid: _listing(first), second_uid: _listing(second)}
    statuses = send_mpps("127.0.0.1", node.port, node.ae_title, mpps_create_dataset(study_uid),
                         mpps_completed_dataset(listing), mpps_uid=mpps_uid)
    assert statuses == (0, 0)
    assert dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                 *first).returncode == 0
    held = node.wait_for_log("study_incomplete", timeout=20, study_uid=study_uid)
    assert any(second_uid in m and "2 of 2 instances" in m for m in held["missing"])
    (study,) = node.studies()
    assert study["state"] == "incomplete" and second_uid in study["note"]
    assert node.find_logs("study_completed") == []

    assert dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                 *second).returncode == 0
    done = node.wait_for_log("study_completed", timeout=20, study_uid=study_uid)
    assert done["policy"] == "mpps" and done["instances"] == 5
    assert len(node.find_logs("study_incomplete")) == 1  # reported once


@pytest.mark.slow
def test_with_the_worklist_down_studies_route_by_tags_and_order_routes_catch_up(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    ris = WorklistSCP(tmp_path / "ris")  # not started yet: the RIS is down
    ris.add("ct", accession="ACC-LATE", modality="CT", procedure_code="CTCHEST")
    node = node_factory("receive", stable_after_seconds=1, models=[CHEST_MODEL],
                        routes=[{"name": "any ct", "match": {"Modality": "CT"},
                                 "models": ["chest-xray-cnn"], "send_to": ["pacs"]},
                                {"name": "chest ct orders", "match": {"Modality": "CT"},
                                 "order": {"RequestedProcedureCode": "CTCHEST"},
                                 "models": ["chest-xray-cnn"], "send_to": ["pacs"]}],
                        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                       "port": 104}],
                        sections={"worklist": ris.section(poll_seconds=1, timeout_seconds=2)})
    study_uid = generate_uid()
    paths = [write_instance(tmp_path / "ct", study_uid=study_uid, series_uid="1.2.3.4",
                            sop_uid=generate_uid(), accession="ACC-LATE") for _ in range(2)]
    assert dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                 *paths).returncode == 0
    node.wait_for_log("study_routed", timeout=20, route="any ct")
    node.wait_for_log("worklist_unreachable", timeout=20)
    time.sleep(3)  # several failed polls
    assert len(node.find_logs("worklist_unreachable")) == 1  # once per outage
    assert [j["route"] for j in node.jobs()] == ["any ct"]

    with ris:
        node.wait_for_log("worklist_restored", timeout=20)
        node.wait_for_log("study_routed", timeout=20, route="chest ct orders")
    jobs = {j["route"]: j for j in node.jobs()}
    assert set(jobs) == {"any ct", "chest ct orders"}
    assert jobs["chest ct orders"]["order"] == "accession ACC-LATE"
