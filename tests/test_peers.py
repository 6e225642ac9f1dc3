"""The peer helpers of tests/support/peers.py against the real programs: DCMTK, Orthanc, the
node."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_node.config import load_config
from tests.support import peers
from tests.support.peers import (
    NodeProcess,
    OrthancServer,
    StoreSCP,
    auto_forward_lua,
    dcmtk,
    to_toml,
    wait_until,
)

# The fixtures of tests/support/peers.py, bound here so that this module works without conftest.py.
orthanc_factory = peers.orthanc_factory
orthanc = peers.orthanc
storescp = peers.storescp
node_factory = peers.node_factory


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)  # exact names only: a pattern tries to download for minutes
    assert path is not None, f"test data file {name} not found"
    return Path(str(path))


CT_SMALL = _testdata("CT_small.dcm")


def test_orthanc_answers_echoscu_and_rest(orthanc: OrthancServer) -> None:
    done = dcmtk("echoscu", "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port))
    assert done.returncode == 0, done.stderr
    assert orthanc.get("/system")["DicomAet"] == orthanc.ae_title
    assert orthanc.studies() == []


def test_storescu_into_storescp_lands_the_file(storescp: StoreSCP) -> None:
    done = dcmtk("storescu", "-aec", storescp.ae_title, "127.0.0.1", str(storescp.port),
                 CT_SMALL)
    assert done.returncode == 0, done.stderr
    [received] = storescp.files()
    assert dcmread(received).SOPInstanceUID == dcmread(CT_SMALL).SOPInstanceUID


def test_orthanc_upload_find_and_download_round_trip(orthanc: OrthancServer) -> None:
    answer = orthanc.upload(CT_SMALL)
    assert answer["Status"] == "Success"
    source = dcmread(CT_SMALL)
    [series] = orthanc.series_of_study(source.StudyInstanceUID)
    assert series["MainDicomTags"]["Modality"] == "CT"
    [instance] = orthanc.find("Instance", {"SOPInstanceUID": source.SOPInstanceUID},
                              expand=False)
    assert orthanc.instance_file(instance) == CT_SMALL.read_bytes()


@pytest.mark.slow
def test_orthanc_auto_forwards_a_stable_study_once_and_not_again_when_results_arrive(
    orthanc_factory: Callable[..., OrthancServer], storescp: StoreSCP, tmp_path: Path
) -> None:
    pacs = orthanc_factory(modalities={"ai": (storescp.ae_title, "127.0.0.1", storescp.port)},
                           stable_age=1, lua=auto_forward_lua("ai"))
    done = dcmtk("storescu", "-aec", pacs.ae_title, "127.0.0.1", str(pacs.dicom_port), CT_SMALL)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: "sent" in pacs.log_text(), 30, "Orthanc to forward the study")
    assert len(storescp.files()) == 1

    # A result (an SR) arrives in the same study: the study settles again, is not re-sent.
    # Orthanc's study ID hashes PatientID and StudyInstanceUID: a result carries both.
    source = dcmread(CT_SMALL, stop_before_pixels=True)
    sr = dcmread(_testdata("test-SR.dcm"))
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate",
                    "PatientSex"):
        setattr(sr, keyword, source.get(keyword, ""))
    sr.SeriesInstanceUID = generate_uid()
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.save_as(tmp_path / "result-sr.dcm")
    done = dcmtk("storescu", "-aec", pacs.ae_title, "127.0.0.1", str(pacs.dicom_port),
                 tmp_path / "result-sr.dcm")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: "already forwarded" in pacs.log_text(), 30,
               "Orthanc to see the study stable again")
    assert len(pacs.series_of_study(sr.StudyInstanceUID)) == 2
    assert len(storescp.files()) == 1
    assert pacs.log_text().count("auto-forward: sending study") == 1


def test_node_receive_process_stores_what_storescu_sends(
    node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory("receive", ae_title="NODE_UNDER_TEST")
    done = dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), CT_SMALL)
    assert done.returncode == 0, done.stderr
    node.wait_for_log("association_closed", instances_stored=1)
    [study] = node.studies()
    assert study["study_instance_uid"] == dcmread(CT_SMALL).StudyInstanceUID
    assert study["instances"] == 1
    assert node.stop() == 0
    assert node.find_logs("receiver_stopped")


def test_node_config_writer_produces_a_config_the_node_accepts(tmp_path: Path) -> None:
    node = NodeProcess(
        tmp_path, "receive", sections={"node": {"on_duplicate": "keep"}},
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                       "port": 4242}],
        models=[{"name": "m", "path": "models/m"}],
        routes=[{"name": "r \"quoted\"", "match": {"Modality": ["CR", {"regex": "^D"}]},
                 "models": ["m"], "send_to": ["pacs"]}])
    node.write_config()
    config = load_config(node.config_path)
    assert config.node.port == node.port
    assert config.node.on_duplicate == "keep"
    assert config.routes[0].name == 'r "quoted"'
    assert config.node.data_dir == tmp_path / "var"
    assert to_toml({"a": {"x": 1.5, "y": True}}) == "[a]\nx = 1.5\ny = true\n"


def test_node_serve_runs_receiver_and_worker_and_stops_both_on_sigterm(
    node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory("serve")
    node.wait_for_log("worker_started", timeout=60)
    assert dcmtk("echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.port)).returncode == 0
    assert node.stop() == 0
    assert node.find_logs("receiver_stopped")
    assert node.find_logs("worker_stopped")
