"""Acknowledged means processable: malformed instances over real loopback associations.

What the receiver can check cheaply in the header it reads (up to (0020,000E)) it refuses, with a
named status and one log event without a traceback. What it cannot (a malformed element further
on, deep nesting after the Series UID, truncated pixel data) it acknowledges, and the later stages
set that one instance aside: the completion summary takes another instance of the series, a
study with nothing readable ends ``failed`` with a note, a job leaves the instance out and says so
in its note — no study stays ``receiving`` because of its content.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE
from sqlalchemy import select
from structlog.testing import capture_logs

from dicom_node import complete
from dicom_node.cli import main
from dicom_node.config import Config, load_config
from dicom_node.jobs import queue, runner
from dicom_node.receive.scp import Receiver
from dicom_node.receive.status import StoreStatus
from dicom_node.store.db import Instance, Job, JobState, Study, StudyState, utcnow
from dicom_node.store.index import reprocess
from tests.conftest import BASIC_CONFIG, free_port, running_receiver, write_config
from tests.support.chest_pacs import ROUTES, routed_config
from tests.support.ct_series import MODEL_DIR, write_chest_ct_series
from tests.support.malformed import (
    UID_ROOT,
    Encoded,
    encode,
    instance,
    nested_sequence,
    raw_element,
    send_raw,
    tag_of,
)
from tests.support.peers import StoreSCP

# pydicom warns about what it reads in malformed files; in production that is a warning, not an
# error, so the receiver must be judged with warnings as warnings here too.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

@pytest.fixture
def node(tmp_path: Path) -> Iterator[Receiver]:
    with running_receiver(routed_config(tmp_path)) as rx:
        yield rx


class Uids:
    """Study, series and instance UIDs of one test, numbered."""

    def __init__(self, key: str) -> None:
        self.root = f"{UID_ROOT}.{key}"
        self.study = f"{self.root}.1"
        self.series = f"{self.root}.2"

    def sop(self, n: int) -> str:
        return f"{self.root}.3.{n}"


def ct(uids: Uids, n: int, pixels: bool = True) -> Encoded:
    return encode(instance("CT_small.dcm", uids.study, uids.series, uids.sop(n), pixels))


def sweep_later(config: Config, rx: Receiver) -> int:
    """One completion sweep as if the studies had been quiet long enough."""
    return complete.sweep(config, rx.context.sessions, now=utcnow() + timedelta(seconds=30))


def study(rx: Receiver, uid: str) -> Study:
    with rx.context.sessions() as session:
        found = session.get(Study, uid)
        assert found is not None
        return found


def instances(rx: Receiver) -> dict[str, Instance]:
    with rx.context.sessions() as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}


def no_traceback(logs: list[dict[str, Any]]) -> bool:
    return not [e for e in logs if "exc_info" in e or "exception" in e]


def cli_rows(config: Config, *args: str, capsys: pytest.CaptureFixture[str]) -> Any:
    capsys.readouterr()
    assert main([*args, "--json", "--config", str(config.source)]) == 0
    return json.loads(capsys.readouterr().out)


def test_fd_manufacturer_of_18_bytes_is_set_aside_and_its_study_routed_with_the_rest(
        node: Receiver, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uids = Uids("10")
    bad = ct(uids, 1, pixels=False)
    bad.replace("Manufacturer", raw_element(tag_of("Manufacturer"), "FD", b"A" * 18))
    good = ct(uids, 2, pixels=False)
    files = [bad.write(tmp_path / "bad.dcm"), good.write(tmp_path / "good.dcm")]
    config = node.context.config
    assert send_raw(node.port, files) == [StoreStatus.SUCCESS, StoreStatus.SUCCESS]
    with capture_logs() as logs:
        assert sweep_later(config, node) == 1
        assert sweep_later(config, node) == 0
    assert study(node, uids.study).state == StudyState.ROUTED
    reason = instances(node)[uids.sop(1)].set_aside_reason
    assert reason is not None and "BytesLengthException" in reason and "AAAA" not in reason
    assert instances(node)[uids.sop(2)].set_aside_reason is None
    set_aside = [e for e in logs if e["event"] == "instance_set_aside"]
    assert [e["sop_instance_uid"] for e in set_aside] == [uids.sop(1)]
    assert no_traceback(logs) and not [e for e in logs if e["event"] == "completion_failed"]
    rows = cli_rows(config, "studies", capsys=capsys)
    assert [(r["set_aside"], r["state"]) for r in rows] == [(1, "routed")]
    assert "1 instance(s) set aside" in rows[0]["note"]


def test_study_whose_only_instance_nests_5000_deep_ends_failed_with_a_note(
        node: Receiver, tmp_path: Path) -> None:
    uids = Uids("11")
    deep = ct(uids, 1, pixels=False)
    # After (0020,000E): the receiver's header read does not reach it, so it is acknowledged.
    deep.replace("RequestAttributesSequence",
                 nested_sequence(tag_of("RequestAttributesSequence"), 5000))
    assert send_raw(node.port, [deep.write(tmp_path / "deep.dcm")]) == [StoreStatus.SUCCESS]
    with capture_logs() as logs:
        sweep_later(node.context.config, node)
        sweep_later(node.context.config, node)
    found = study(node, uids.study)
    assert found.state == StudyState.FAILED
    assert found.note is not None and "set aside as unreadable" in found.note
    assert "RecursionError" in (instances(node)[uids.sop(1)].set_aside_reason or "")
    assert [e["event"] for e in logs if e["event"] in {"instance_set_aside",
                                                       "study_unreadable"}] == [
        "instance_set_aside", "study_unreadable"]
    assert no_traceback(logs)


def test_nesting_5000_deep_before_the_series_uid_is_refused_with_one_event_and_no_traceback(
        node: Receiver, tmp_path: Path) -> None:
    uids = Uids("12")
    deep = ct(uids, 1, pixels=False)
    deep.replace("ReferencedStudySequence",
                 nested_sequence(tag_of("ReferencedStudySequence"), 5000))
    with capture_logs() as logs:
        statuses = send_raw(node.port, [deep.write(tmp_path / "deep.dcm")])
    assert statuses == [StoreStatus.CANNOT_UNDERSTAND]
    refused = [e for e in logs if e["event"] == "instance_refused"]
    assert len(refused) == 1 and "RecursionError" in refused[0]["reason"]
    assert no_traceback(logs)
    assert instances(node) == {}


def test_data_set_without_sop_instance_uid_is_refused_as_not_matching_its_request(
        node: Receiver, tmp_path: Path) -> None:
    uids = Uids("13")
    orphan = ct(uids, 1, pixels=False)
    orphan.drop("SOPInstanceUID")  # the request still names one (from the file meta)
    with capture_logs() as logs:
        statuses = send_raw(node.port, [orphan.write(tmp_path / "orphan.dcm")])
    assert statuses == [StoreStatus.DATASET_MISMATCH]
    refused = [e for e in logs if e["event"] == "instance_refused"]
    assert len(refused) == 1 and "no SOPInstanceUID" in refused[0]["reason"]
    assert refused[0]["status"] == "DATASET_MISMATCH" and no_traceback(logs)
    assert instances(node) == {}
    assert not [p for p in node.context.config.node.data_dir.rglob("*.dcm")]


def test_an_unreadable_representative_is_replaced_by_the_next_instance_of_its_series(
        node: Receiver, tmp_path: Path) -> None:
    uids = Uids("14")
    bad = ct(uids, 1, pixels=False)
    # a declared length longer than what follows: the rest of the data set is swallowed
    bad.replace("Manufacturer", raw_element(tag_of("Manufacturer"), "US", b"\x01\x00\x02"))
    good = ct(uids, 2, pixels=False)
    send_raw(node.port, [bad.write(tmp_path / "a.dcm"), good.write(tmp_path / "b.dcm")])
    with node.context.sessions() as session:
        summary = complete.summarize_stored_study(session, node.context.config.node.data_dir,
                                                  uids.study)
        session.commit()
    assert summary.values["Modality"] == frozenset({"CT"})
    assert (summary.series_count, summary.instance_count) == (1, 1)
    assert instances(node)[uids.sop(1)].set_aside_reason


def _truncated(encoded: Encoded) -> Encoded:
    """Cut the pixel data's value short: the header (and its declared length) stay whole."""
    encoded.cut_at = len(encoded.dataset_bytes()) - 100_000
    return encoded


@pytest.mark.slow
def test_a_truncated_instance_is_left_out_of_the_job_and_named_in_its_note(
        tmp_path: Path, storescp: StoreSCP, capsys: pytest.CaptureFixture[str]) -> None:
    config = routed_config(tmp_path, storescp.port)
    uids = Uids("15")
    chest = [encode(instance("RG1_UNCR.dcm", uids.study, uids.series, uids.sop(n)))
             for n in range(3)]
    _truncated(chest[1])
    files = [c.write(tmp_path / f"cr{n}.dcm") for n, c in enumerate(chest)]
    with running_receiver(config) as rx:
        assert send_raw(rx.port, files) == [StoreStatus.SUCCESS] * 3
        assert sweep_later(config, rx) == 1
        sessions = rx.context.sessions
        job = queue.claim(sessions, "test-worker", config.jobs)
        assert job is not None
        with capture_logs() as logs:
            runner.run_job(config, sessions, job)
        with sessions() as session:
            row = session.scalars(select(Job)).one()
            assert row.state == JobState.DONE, row.last_error
            assert row.note is not None and uids.sop(1) in row.note
            assert "truncated" in row.note
        assert [e["sop_instance_uid"] for e in logs if e["event"] == "instance_set_aside"] == [
            uids.sop(1)]
        inference = [e for e in logs if e["event"] == "inference_done"]
        assert inference and inference[0]["images"] == 2
        rows = cli_rows(config, "jobs", capsys=capsys)
        assert uids.sop(1) in rows[0]["note"]
    received = [dcmread(p) for p in storescp.output_dir.rglob("*") if p.is_file()]
    assert [ds.Modality for ds in received] == ["SR"]
    referenced = {str(element.value) for ds in received for element in ds.iterall()
                  if element.keyword == "ReferencedSOPInstanceUID"}
    assert uids.sop(0) in referenced
    assert uids.sop(1) not in referenced


def test_a_re_sent_good_copy_of_a_set_aside_instance_is_read_again(
        node: Receiver, tmp_path: Path) -> None:
    uids = Uids("16")
    bad = ct(uids, 1, pixels=False)
    bad.replace("Manufacturer", raw_element(tag_of("Manufacturer"), "FD", b"A" * 18))
    send_raw(node.port, [bad.write(tmp_path / "bad.dcm")])
    sweep_later(node.context.config, node)
    assert study(node, uids.study).state == StudyState.FAILED
    fixed = ct(uids, 1, pixels=False)
    assert send_raw(node.port, [fixed.write(tmp_path / "fixed.dcm")]) == [StoreStatus.SUCCESS]
    assert instances(node)[uids.sop(1)].set_aside_reason is None
    # a re-sent instance does not reopen a processed study: the administrator reprocesses it
    assert reprocess(node.context.sessions, [uids.study])[0] == [uids.study]
    sweep_later(node.context.config, node)
    assert study(node, uids.study).state == StudyState.ROUTED


def test_raw_element_declares_the_length_it_is_given() -> None:
    """The helper itself: a 2-byte-length VR and a 4-byte-length VR."""
    assert raw_element(0x00080070, "FD", b"x" * 18)[6:8] == struct.pack("<H", 18)
    assert raw_element(0x7FE00010, "OB", b"", length=8)[8:12] == struct.pack("<I", 8)


def test_a_study_whose_completion_keeps_failing_logs_its_traceback_once(
        node: Receiver, tmp_path: Path) -> None:
    """Not the content: the index lost its jobs table, so routing fails at every sweep."""
    uids = Uids("17")
    send_raw(node.port, [ct(uids, 1, pixels=False).write(tmp_path / "a.dcm")])
    with node.context.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE jobs RENAME TO jobs_gone")
    with capture_logs() as logs:
        for _ in range(3):
            assert sweep_later(node.context.config, node) == 0
    failed = [e for e in logs if e["event"] == "completion_failed"]
    assert [("exc_info" in e, e.get("repeated", False)) for e in failed] == [
        (True, False), (False, True), (False, True)]
    assert failed[1]["log_level"] == "debug"


def _corrupt_rle(path: Path) -> Dataset:
    """The slice at ``path`` as RLE Lossless whose one fragment parses but does not decode: a
    valid RLE header naming one segment, then too few bytes for the image."""
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = RLELossless
    header = struct.pack("<16L", 1, 64, *([0] * 14))
    ds.PixelData = encapsulate([header + b"\x7f\x00" * 32])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


@pytest.mark.slow
def test_a_ct_slice_whose_pixels_cannot_be_decoded_is_set_aside_and_the_series_segmented(
        tmp_path: Path, storescp: StoreSCP) -> None:
    """The segmenter decodes each plane only when its chunk runs: an undecodable slice is found
    mid-job, set aside, and the model runs again on the rest of the series in the same attempt."""
    text = BASIC_CONFIG.format(port=free_port(), stable=1, node_extra="") + ROUTES.format(
        pacs_port=storescp.port, model="lung-nodule-unet",
        model_path=str(MODEL_DIR).replace("\\", "/"))
    config = load_config(write_config(tmp_path, text))
    files = write_chest_ct_series(tmp_path / "ct", slices=12, rows=128)
    broken = _corrupt_rle(files[5])
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, RLELossless)
    with running_receiver(config) as rx:
        assert send_raw(rx.port, files[:5] + files[6:]) == [StoreStatus.SUCCESS] * 11
        assoc = ae.associate("127.0.0.1", rx.port, ae_title="DICOM_NODE")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(broken).Status == StoreStatus.SUCCESS
        finally:
            assoc.release()
        assert sweep_later(config, rx) == 1
        sessions = rx.context.sessions
        job = queue.claim(sessions, "test-worker", config.jobs)
        assert job is not None
        with capture_logs() as logs:
            runner.run_job(config, sessions, job)
        with sessions() as session:
            row = session.scalars(select(Job)).one()
            assert row.state == JobState.DONE, row.last_error
            assert row.attempts == 1
            assert row.note is not None and str(broken.SOPInstanceUID) in row.note
            assert "cannot decode pixel data" in row.note
    aside = [e for e in logs if e["event"] == "instance_set_aside"]
    assert [e["sop_instance_uid"] for e in aside] == [str(broken.SOPInstanceUID)]
    assert not [e for e in logs if "exception" in e or e.get("exc_info")]
    received = [dcmread(p) for p in storescp.output_dir.rglob("*") if p.is_file()]
    assert sorted(ds.Modality for ds in received) in (["SR"], ["SEG", "SR"])
    referenced = {str(element.value) for ds in received for element in ds.iterall()
                  if element.keyword == "ReferencedSOPInstanceUID"}
    assert str(broken.SOPInstanceUID) not in referenced


def test_route_dry_run_on_a_folder_leaves_out_unreadable_files_and_says_so(
        tmp_path: Path) -> None:
    config = routed_config(tmp_path)
    folder = tmp_path / "study"
    folder.mkdir()
    uids = Uids("17")
    ct(uids, 1).write(folder / "good.dcm")
    bad = ct(uids, 2)
    bad.replace("Manufacturer", raw_element(tag_of("Manufacturer"), "FD", b"A" * 18))
    bad.write(folder / "bad.dcm")
    (folder / "notes.txt").write_text("not DICOM")
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "route", "--dry-run", str(folder),
         "--config", str(config.source)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    left_out = sorted(line for line in result.stdout.splitlines() if line.startswith("left out"))
    assert [line.split(":")[0] for line in left_out] == [
        f"left out {folder / 'bad.dcm'}", f"left out {folder / 'notes.txt'}"]
    assert "1 instance(s)" in result.stdout
    assert "route 'images': FIRES" in result.stdout


def test_route_dry_run_on_a_file_that_is_not_dicom_fails_with_a_clear_error(
        tmp_path: Path) -> None:
    config = routed_config(tmp_path)
    (tmp_path / "notes.txt").write_text("not DICOM")
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "route", "--dry-run", str(tmp_path / "notes.txt"),
         "--config", str(config.source)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert f"{tmp_path / 'notes.txt'}: no DICOM file that can be read" in result.stderr
