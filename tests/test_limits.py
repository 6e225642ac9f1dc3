"""A peer can make the receiver hold only bounded resources: connections are capped at accept
time, a PDU longer than the maximum is refused before it is buffered, and a PDU that trickles in
is cut off at one deadline for the whole PDU."""

from __future__ import annotations

import inspect
import socket
import struct
import time
from collections.abc import Iterator

import pynetdicom.transport
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from dicom_node.config import Config
from dicom_node.receive import limits
from dicom_node.receive.scp import Receiver
from dicom_node.store.db import make_engine
from tests.peers import dcmtk, wait_until


def _receiver(node_config: Config, **node: object) -> Receiver:
    config = node_config.model_copy(update={"node": node_config.node.model_copy(update=node)})
    rx = Receiver(config, make_engine(config.database.url))
    rx.start()
    return rx


@pytest.fixture
def strict_receiver(node_config: Config) -> Iterator[Receiver]:
    rx = _receiver(node_config, max_connections=3, network_timeout_seconds=1.5,
                   acse_timeout_seconds=2, max_pdu_bytes=16384)
    try:
        yield rx
    finally:
        rx.stop()
        limits.uninstall_bounded_reads()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_pynetdicom_still_reads_pdus_through_association_socket_recv() -> None:
    # dicom_node/receive/limits.py replaces this method; revisit it if pynetdicom changes.
    assert "def recv(self, nr_bytes: int) -> bytearray" in inspect.getsource(
        limits._original_recv)
    source = inspect.getsource(pynetdicom.dul.DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(pdu_length)" in source


def refused(rx: Receiver, reason: str) -> float:
    """The receiver's dicom_node_peers_refused_total{reason} (monitor.counters)."""
    registry = CollectorRegistry()
    registry.register(rx.context.counters)
    value = registry.get_sample_value("dicom_node_peers_refused_total", {"reason": reason})
    return float(value or 0.0)


def test_an_announced_4gb_pdu_is_refused_before_it_is_buffered(
        strict_receiver: Receiver) -> None:
    sock = _connect(strict_receiver.port)
    with capture_logs() as logs:
        sock.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFF0) + b"\x00" * 64)
        assert _closed_by_peer(sock, within=5)
    sock.close()
    assert any(e["event"] == "pdu_refused" for e in logs)
    assert refused(strict_receiver, "pdu_too_long") == 1
    assert dcmtk("echoscu", "-aec", "DICOM_NODE", "127.0.0.1",
                 str(strict_receiver.port)).returncode == 0


def test_a_pdu_that_trickles_in_is_cut_off_at_one_deadline(strict_receiver: Receiver) -> None:
    sock = _connect(strict_receiver.port)
    sock.sendall(b"\x01\x00" + struct.pack(">L", 1000))
    start = time.monotonic()
    closed = False
    for _ in range(20):  # one byte every 0.3 s: each recv alone would never time out
        try:
            sock.sendall(b"\x00")
        except OSError:
            closed = True
            break
        if _closed_by_peer(sock, within=0.3):
            closed = True
            break
    sock.close()
    assert closed
    assert time.monotonic() - start < 4  # network_timeout_seconds = 1.5 for the whole PDU
    wait_until(lambda: refused(strict_receiver, "pdu_read_timeout") == 1, 5, "counted")


def test_connections_beyond_the_cap_are_closed_at_accept_time(
        strict_receiver: Receiver) -> None:
    silent = [_connect(strict_receiver.port) for _ in range(3)]
    time.sleep(0.3)
    with capture_logs() as logs:
        extra = _connect(strict_receiver.port)
        assert _closed_by_peer(extra, within=2)
    extra.close()
    assert any(e["event"] == "connection_refused" for e in logs)
    assert refused(strict_receiver, "connection_cap") == 1
    for sock in silent:
        sock.close()
    # A connection that never negotiated holds its slot until acse_timeout_seconds (2 s here).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if dcmtk("echoscu", "-aec", "DICOM_NODE", "127.0.0.1",
                 str(strict_receiver.port)).returncode == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the receiver did not accept a connection after the silent ones closed")
