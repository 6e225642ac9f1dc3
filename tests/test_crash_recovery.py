"""kill -9 of the receiver or of a worker at a bad moment, then a restart: every instance stored,
every study processed, every result sent, with the same result UIDs when a job ran twice."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.infer.card import load_card
from dicom_node.uids import result_uids
from tests.conftest import sample_file
from tests.peers import PEER_ENV, NodeProcess, StoreSCP, dcmtk, wait_until
from tests.test_e2e_orthanc import CHEST_MODEL, CHEST_ROUTE


def _node_to(storescp: StoreSCP, node_factory: Callable[..., NodeProcess],
             **kwargs: object) -> NodeProcess:
    return node_factory(
        "receive", models=[CHEST_MODEL], routes=[CHEST_ROUTE],
        destinations=[{"name": "pacs", "ae_title": storescp.ae_title, "host": "127.0.0.1",
                       "port": storescp.port}],
        sections={"jobs": {"poll_seconds": 0.2, "lease_seconds": 3, "retry_base_seconds": 1}},
        **kwargs)


@pytest.mark.slow
def test_worker_killed_mid_job_is_replaced_and_the_result_has_the_same_uids(
        storescp: StoreSCP, node_factory: Callable[..., NodeProcess]) -> None:
    receiver = _node_to(storescp, node_factory)
    worker = node_factory("worker", like=receiver)
    chest = sample_file("RG1_UNCR.dcm")
    study_uid = str(dcmread(chest, stop_before_pixels=True).StudyInstanceUID)
    sent = dcmtk("storescu", "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port), chest)
    assert sent.returncode == 0, sent.stderr

    worker.wait_for_log("job_started", timeout=60)
    worker.kill(signal.SIGKILL)  # mid-job: the model is loading or running
    worker.process.wait(timeout=10)  # type: ignore[union-attr]
    assert worker.find_logs("job_done") == []

    replacement = node_factory("worker", like=receiver)
    replacement.wait_for_log("job_done", timeout=90)
    (job,) = replacement.jobs()
    assert (job["state"], job["attempts"]) == ("done", 2)  # the lease expired; it ran again

    card = load_card(Path(CHEST_MODEL["path"]))
    expected = result_uids(study_uid, CHEST_ROUTE["name"], card.name, card.version, "sr")
    (received,) = [dcmread(p) for p in storescp.files()]
    assert received.SOPInstanceUID == expected.sop_instance_uid
    assert received.SeriesInstanceUID == expected.series_instance_uid
    assert received.StudyInstanceUID == study_uid


def _ct_series(folder: Path, count: int) -> list[Path]:
    template = dcmread(sample_file("CT_small.dcm"))
    template.StudyInstanceUID = generate_uid()
    template.SeriesInstanceUID = generate_uid()
    folder.mkdir()
    paths = []
    for i in range(count):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = i + 1
        path = folder / f"ct{i:03d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_receiver_killed_mid_association_loses_nothing_it_acknowledged(
        storescp: StoreSCP, node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    receiver = _node_to(storescp, node_factory, stable_after_seconds=4.0)
    files = _ct_series(tmp_path / "series", 60)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    report = tmp_path / "storescu.log"
    with open(report, "w") as log:
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port),
             *map(str, files)], env=PEER_ENV, stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: report.read_text().count("Received Store Response (Success)") >= 10,
               30, "ten acknowledged instances")
    receiver.kill(signal.SIGKILL)
    sender.wait(timeout=30)
    acknowledged = report.read_text().count("Received Store Response (Success)")
    assert 10 <= acknowledged < len(files)

    # Everything acknowledged before the crash is in the spool, whole, and in the index.
    restarted = node_factory("receive", like=receiver)
    (study,) = restarted.studies()
    assert study["instances"] >= acknowledged
    for path in restarted.spool_dir.rglob("*.dcm"):
        assert dcmread(path).StudyInstanceUID == study_uid

    # The sender re-sends the study; it ends complete, once, with every instance.
    resent = dcmtk("storescu", "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port),
                   *files)
    assert resent.returncode == 0, resent.stderr
    restarted.wait_for_log("study_completed", timeout=30)
    (study,) = restarted.studies()
    assert (study["instances"], study["state"], study["generation"]) == (
        len(files), "unrouted", 0)
    assert len(list(restarted.spool_dir.rglob("*.dcm"))) == len(files)
