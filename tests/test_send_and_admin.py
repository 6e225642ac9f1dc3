"""Sending and administration against real peers: echo, send, a destination that is down
(capped backoff, then failed and visible, then an administrator's retry), live config reload."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.config import Destination
from dicom_node.errors import SendError
from dicom_node.receive.scp import Receiver
from dicom_node.send.scu import echo, send_files
from tests.conftest import sample_file
from tests.support.chest_pacs import CHEST_MODEL, CHEST_ROUTE
from tests.support.peers import NodeProcess, StoreSCP, dcmtk, free_port


def test_echo_and_send_reach_a_configured_destination(
        storescp: StoreSCP, node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = node_factory("receive", start=False, destinations=[
        {"name": "archive", "ae_title": storescp.ae_title, "host": "127.0.0.1",
         "port": storescp.port}])
    echo = node.cli("echo", "archive")
    assert echo.returncode == 0, echo.stderr
    assert "status 0x0000" in echo.stdout
    folder = tmp_path / "send"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (folder / name).write_bytes(sample_file(name).read_bytes())
    sent = node.cli("send", "--to", "archive", str(folder))
    assert sent.returncode == 0, sent.stderr
    assert "2 sent" in sent.stdout
    assert len(storescp.files()) == 2


def test_echo_to_an_unknown_destination_names_it(
        node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory("receive", start=False)
    result = node.cli("echo", "nowhere")
    assert result.returncode == 2
    assert "unknown destination 'nowhere'" in result.stderr


@pytest.mark.slow
def test_a_destination_that_is_down_fails_the_job_visibly_and_an_admin_retry_delivers(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    down_port = free_port()
    receiver = node_factory(
        "receive", models=[CHEST_MODEL], routes=[CHEST_ROUTE],
        destinations=[{"name": "pacs", "ae_title": "LATER", "host": "127.0.0.1",
                       "port": down_port, "timeout_seconds": 2}],
        sections={"jobs": {"poll_seconds": 0.2, "max_attempts": 3, "retry_base_seconds": 0.5,
                           "retry_max_seconds": 1, "delivery_window_hours": 0.002}})
    worker = node_factory("worker", like=receiver)
    sent = dcmtk("storescu", "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port),
                 sample_file("RG1_UNCR.dcm"))
    assert sent.returncode == 0, sent.stderr

    # An outage is waited out (no attempt spent) until the delivery window (7.2 s) is over.
    failed = worker.wait_for_log("job_failed", timeout=90)
    deferred = worker.find_logs("delivery_deferred")
    assert len(deferred) >= 3 and failed["delivery_attempts"] == len(deferred) + 1
    assert not worker.find_logs("job_retry")
    assert "LATER@127.0.0.1" in failed["reason"] and "pacs unreachable since" in failed["reason"]
    (job,) = worker.jobs()
    assert job["state"] == "failed"
    assert f"LATER@127.0.0.1:{down_port}: cannot connect: [Errno 111] Connection refused" in (
        job["last_error"])
    (study,) = worker.studies()
    assert study["state"] == "failed"
    # The model ran once; the retries only re-sent the stored result.
    assert len(worker.find_logs("inference_done")) == 1

    with StoreSCP(tmp_path / "late-pacs", ae_title="LATER", port=down_port) as pacs:
        retried = worker.cli("jobs", "retry")
        assert "re-queued 1 failed job(s): 1" in retried.stdout
        worker.wait_for_log("job_done", timeout=30)
        assert len(pacs.files()) == 1
    (study,) = worker.studies()
    assert study["state"] == "done"


@pytest.mark.slow
def test_running_node_reloads_a_valid_config_and_refuses_an_invalid_one(
        node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory("receive")
    text = node.config_path.read_text()
    node.config_path.write_text(text.replace("stable_after_seconds = 1.0",
                                             "stable_after_seconds = 7.0"))
    node.kill(signal.SIGHUP)
    node.wait_for_log("config_reloaded", timeout=10)
    node.config_path.write_text(text.replace("stable_after_seconds = 1.0",
                                             "stable_after_seconds = -1"))
    rejected = node.wait_for_log("config_rejected", timeout=10)
    assert "completion.stable_after_seconds: Input should be greater than 0" in rejected["reason"]
    assert node.returncode is None  # still running on the last good config
    echo = dcmtk("echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.port))
    assert echo.returncode == 0


def test_a_rejected_association_says_why(receiver: Receiver) -> None:
    """The peer is the node's own SCP with a calling-AE allow-list that leaves the sender out."""
    config = receiver.context.config
    receiver.reconfigure(config.model_copy(update={"node": config.node.model_copy(
        update={"allowed_calling_aets": ("MODALITY1",), "check_called_ae_title": True})}))
    pacs = Destination(name="pacs", ae_title="DICOM_NODE", host="127.0.0.1",
                       port=receiver.port, timeout_seconds=5)
    with pytest.raises(SendError, match=r"pacs: DICOM_NODE@127\.0\.0\.1:\d+: association "
                       r"rejected \(Rejected Permanent by Service User: Calling AE title not "
                       r"recognised\)"):
        send_files(pacs, [sample_file("CT_small.dcm")], "INTRUDER")
    with pytest.raises(SendError, match=r"Called AE title not recognised"):
        echo(pacs.model_copy(update={"ae_title": "ELSEWHERE"}), "MODALITY1")
    assert echo(pacs, "MODALITY1") == 0
