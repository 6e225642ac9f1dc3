"""A peer can make the receiver hold only bounded resources: connections are capped at accept
time, in all and per host, a connection still negotiating makes room for a new one, the
association request has its own deadline (ARTIM), a PDU longer than the maximum is refused before
it is buffered, and a PDU that trickles in is cut off at one deadline for the whole PDU."""

from __future__ import annotations

import inspect
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pynetdicom.acse
import pynetdicom.association
import pynetdicom.fsm
import pynetdicom.transport
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from dicom_node.config import Config, load_config
from dicom_node.receive import limits
from dicom_node.receive.scp import Receiver
from dicom_node.store.db import make_engine
from tests.conftest import write_config
from tests.support.metrics import refused
from tests.support.peers import dcmtk, free_port, wait_until
from tests.support.tls_certs import TestCA


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


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the receiver from ``source`` (all of 127.0.0.0/8 is loopback)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


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


def test_pynetdicom_still_waits_for_the_request_as_the_connection_cap_expects() -> None:
    # limits.ConnectionCap keys connections by the accepted socket, sets the acceptor's
    # acse_timeout (its ARTIM timer and its wait for the A-ASSOCIATE-RQ) at EVT_CONN_OPEN, and
    # ends an evicted acceptor's wait by queueing None; revisit it if pynetdicom changes these.
    handler = inspect.getsource(pynetdicom.transport.RequestHandler)
    assert "AssociationSocket(assoc, client_socket=self.request)" in handler
    assert handler.index("evt.EVT_CONN_OPEN") < handler.index("assoc.start()")
    acse_timeout = vars(pynetdicom.association.Association)["acse_timeout"]
    assert isinstance(acse_timeout, property) and acse_timeout.fset is not None
    setter = inspect.getsource(acse_timeout.fset)
    assert "self.dul.artim_timer.timeout = value" in setter
    reactor = inspect.getsource(pynetdicom.association.Association.run_reactor)
    wait = reactor.index("primitive = self.dul.receive_pdu(wait=True, timeout=self.acse_timeout)")
    assert reactor.index("if primitive is None:", wait) < reactor.index("EVT_REQUESTED", wait)
    assert "self.to_user_queue.get(block=wait, timeout=timeout)" in inspect.getsource(
        pynetdicom.dul.DULServiceProvider.receive_pdu)
    assert "dul.artim_timer.start()" in inspect.getsource(pynetdicom.fsm.AE_5)
    # limits.ReceiverAE raises maximum_associations by the threads that hold no association.
    acceptor = inspect.getsource(pynetdicom.acse.ACSE._negotiate_as_acceptor)
    assert "len(active_acceptors) > self.assoc.ae.maximum_associations" in acceptor


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


def _echo_from(port: int, source: str) -> int:
    """A C-ECHO by DCMTK's echoscu (from 127.0.0.1) or pynetdicom bound to ``source``; its
    status, -1 without an association."""
    if source == "127.0.0.1":
        done = dcmtk("echoscu", "-aec", "DICOM_NODE", "127.0.0.1", str(port), timeout=20)
        return 0 if done.returncode == 0 else -1
    ae = AE(ae_title="LEGIT")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE", bind_address=(source, 0))
    if not assoc.is_established:
        return -1
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _acceptor_threads() -> list[threading.Thread]:
    """The receiver's association threads (pynetdicom names them AcceptorThread@…)."""
    return [t for t in threading.enumerate() if t.name.startswith("AcceptorThread")]


def test_a_new_connection_evicts_the_oldest_one_still_negotiating(
        node_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "EVICTABLE_AFTER_S", 2.0)  # 1 s: too short on a loaded machine
    rx = _receiver(node_config, max_connections=3, max_connections_per_host=3)
    silent: list[socket.socket] = []
    try:
        silent = [_connect(rx.port) for _ in range(3)]
        wait_until(lambda: rx._cap.open_connections() == 3, 5, "three connections")
        with capture_logs() as logs:
            young = _connect(rx.port)  # the three were just accepted: none is evicted yet
            assert _closed_by_peer(young, within=3)
            young.close()
            time.sleep(limits.EVICTABLE_AFTER_S)
            silent.append(_connect(rx.port))
            assert _closed_by_peer(silent[0], within=3)  # the oldest made room
            assert not _closed_by_peer(silent[3], within=0.3)
        # Its association's thread ended at once, not at the request deadline (5 s).
        wait_until(lambda: len(_acceptor_threads()) == 3, 2, "the evicted one's thread to end")
        assert [e["event"] for e in logs if e["event"].startswith("connection_")] == [
            "connection_refused", "connection_evicted"]
        assert refused(rx, "evicted") == 1 and refused(rx, "connection_cap") == 1
        # The cap is still full of silent connections: a real peer gets in all the same.
        assert _echo_from(rx.port, "127.0.0.1") == 0
        assert refused(rx, "evicted") == 2
    finally:
        for sock in silent:
            sock.close()
        rx.stop()
        limits.uninstall_bounded_reads()


def test_associations_are_never_evicted_and_the_next_connection_is_refused(
        node_config: Config) -> None:
    rx = _receiver(node_config, max_connections=3, max_connections_per_host=3)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", rx.port, ae_title="DICOM_NODE") for _ in range(3)]
    try:
        assert all(a.is_established for a in held)
        with capture_logs() as logs:
            extra = _connect(rx.port)
            assert _closed_by_peer(extra, within=3)
        extra.close()
        assert [e["event"] for e in logs if e["event"].startswith("connection_")] == [
            "connection_refused"]
        assert refused(rx, "connection_cap") == 1 and refused(rx, "evicted") == 0
        assert all(a.send_c_echo().Status == 0 for a in held)  # still there
    finally:
        for assoc in held:
            assoc.release()
        rx.stop()
        limits.uninstall_bounded_reads()


def test_connections_still_negotiating_do_not_count_as_associations(
        node_config: Config) -> None:
    rx = _receiver(node_config, max_associations=2, max_connections=10,
                   max_connections_per_host=10)
    silent = [_connect(rx.port) for _ in range(3)]
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = []
    try:
        wait_until(lambda: len(_acceptor_threads()) == 3, 5, "three negotiating connections")
        # pynetdicom alone counts their threads against max_associations (2) and rejects.
        held = [ae.associate("127.0.0.1", rx.port, ae_title="DICOM_NODE") for _ in range(2)]
        assert all(a.is_established for a in held)
        with capture_logs() as logs:
            third = ae.associate("127.0.0.1", rx.port, ae_title="DICOM_NODE")
        assert third.is_rejected  # max_associations still holds for associations
        [rejected] = [e for e in logs if e["event"] == "association_rejected"]
        assert rejected["reason"] == "2 associations already open (node.max_associations)"
    finally:
        for assoc in held:
            assoc.release()
        for sock in silent:
            sock.close()
        rx.stop()
        limits.uninstall_bounded_reads()


def test_one_host_evicts_its_own_connections_not_another_hosts(
        node_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "EVICTABLE_AFTER_S", 0.2)
    rx = _receiver(node_config, max_connections=4, max_connections_per_host=2)
    opened: list[socket.socket] = []
    try:
        others = [_connect(rx.port, "127.0.0.2") for _ in range(2)]
        crowd = [_connect(rx.port, "127.0.0.1") for _ in range(2)]
        opened += others + crowd
        wait_until(lambda: rx._cap.open_connections() == 4, 5, "four connections")
        # The crowd's host is at its share: its next connection evicts its own oldest, though
        # another host's connections are older.
        time.sleep(limits.EVICTABLE_AFTER_S)
        opened.append(_connect(rx.port, "127.0.0.1"))
        assert _closed_by_peer(crowd[0], within=3)
        assert not any(_closed_by_peer(s, within=0.2) for s in (*others, crowd[1], opened[-1]))
        # A third host, under its share with all slots taken: the oldest still negotiating of
        # all goes, another host's this time.
        opened.append(_connect(rx.port, "127.0.0.3"))
        assert _closed_by_peer(others[0], within=3)
        assert refused(rx, "evicted") == 2
    finally:
        for sock in opened:
            sock.close()
        rx.stop()
        limits.uninstall_bounded_reads()


@pytest.fixture
def artim_receiver(node_config: Config) -> Iterator[Receiver]:
    """A receiver whose association request deadline (1 s) comes long before its PDU one."""
    rx = _receiver(node_config, association_request_timeout_seconds=1.0,
                   network_timeout_seconds=30, acse_timeout_seconds=30)
    try:
        yield rx
    finally:
        rx.stop()
        limits.uninstall_bounded_reads()


def test_a_silent_peer_is_dropped_at_the_association_request_deadline(
        artim_receiver: Receiver) -> None:
    with capture_logs() as logs:
        sock = _connect(artim_receiver.port)
        start = time.monotonic()
        assert _closed_by_peer(sock, within=6)
        held = time.monotonic() - start
        wait_until(lambda: any(e["event"] == "association_request_timeout" for e in logs), 3,
                   "the log event")
    sock.close()
    assert 0.8 < held < 4  # 1 s; pynetdicom's own ARTIM would have waited acse_timeout (30 s)
    assert refused(artim_receiver, "association_request_timeout") == 1
    wait_until(lambda: artim_receiver._cap.open_connections() == 0, 3, "the slot freed")


def test_a_trickling_request_is_dropped_at_the_association_request_deadline(
        artim_receiver: Receiver) -> None:
    sock = _connect(artim_receiver.port)
    start = time.monotonic()
    with capture_logs() as logs:
        sock.sendall(b"\x01\x00" + struct.pack(">L", 1000))
        closed = False
        for _ in range(20):  # one byte every 0.3 s: the PDU deadline (30 s) is far off
            try:
                sock.sendall(b"\x00")
            except OSError:
                closed = True
                break
            if _closed_by_peer(sock, within=0.3):
                closed = True
                break
    held = time.monotonic() - start
    sock.close()
    assert closed and held < 4
    assert [e["event"] for e in logs if e["event"].endswith("_timeout")] == [
        "association_request_timeout"]
    assert refused(artim_receiver, "association_request_timeout") == 1
    assert refused(artim_receiver, "pdu_read_timeout") == 0


def test_a_reload_applies_the_new_caps_and_request_deadline(node_config: Config) -> None:
    rx = _receiver(node_config)
    silent = _connect(rx.port)
    try:
        assert (rx._cap.limit, rx._cap.per_host_limit, rx._cap.request_seconds) == (24, 12, 5)
        wait_until(lambda: len(_acceptor_threads()) == 1, 5, "the silent connection's thread")
        node = rx.context.config.node.model_copy(update={
            "max_connections": 40, "max_connections_per_host": 30,
            "association_request_timeout_seconds": 1.0, "acse_timeout_seconds": 40})
        rx.reconfigure(rx.context.config.model_copy(update={"node": node}))
        assert (rx._cap.limit, rx._cap.per_host_limit, rx._cap.request_seconds) == (40, 30, 1)
        # The AE's new acse_timeout (40 s), which pynetdicom gives every running association,
        # does not become the deadline of the connection still negotiating.
        assert _closed_by_peer(silent, within=6)
    finally:
        silent.close()
        rx.stop()
        limits.uninstall_bounded_reads()


def test_tls_handshakes_make_room_and_the_request_deadline_starts_when_the_handshake_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "EVICTABLE_AFTER_S", 0.2)
    ca = TestCA(tmp_path / "ca")
    node, modality = ca.issue("dicom-node"), ca.issue("ct-scanner")
    config = load_config(write_config(tmp_path, f"""
[node]
port = {free_port()}
bind = "127.0.0.1"
max_connections = 2
max_connections_per_host = 2
association_request_timeout_seconds = 1.0
[node.tls]
port = {free_port()}
certificate = "{node.certificate}"
private_key = "{node.private_key}"
ca_certificates = "{ca.certificate}"
"""))
    rx = Receiver(config, make_engine(config.database.url))
    rx.start()
    context = ssl.create_default_context(cafile=ca.certificate)
    context.load_cert_chain(modality.certificate, modality.private_key)
    silent = [_connect(rx.tls_port) for _ in range(2)]  # TCP only: still in their handshake
    try:
        time.sleep(limits.EVICTABLE_AFTER_S + 0.1)
        with capture_logs() as logs:
            client = context.wrap_socket(_connect(rx.tls_port), server_hostname="localhost")
            handshake_done = time.monotonic()
            assert _closed_by_peer(silent[0], within=3)  # evicted in its handshake
            # The client says nothing after its handshake: cut at the request deadline, 1 s
            # after the handshake ended (the handshake's own deadline is 30 s).
            assert _closed_by_peer(client, within=5)
            held = time.monotonic() - handshake_done
            client.close()
            wait_until(lambda: refused(rx, "association_request_timeout") == 1, 3, "counted")
        assert 0.8 < held < 4
        assert [e["event"] for e in logs if e["event"] in (
            "connection_evicted", "association_request_timeout")] == [
            "connection_evicted", "association_request_timeout"]
        # And a real TLS peer gets in while the other silent connection holds a slot.
        echo = dcmtk("echoscu", "-aec", "DICOM_NODE", "+tls", modality.private_key,
                     modality.certificate, "+cf", ca.certificate, "127.0.0.1",
                     str(rx.tls_port), timeout=30)
        assert echo.returncode == 0, echo.stderr
    finally:
        for sock in silent:
            sock.close()
        rx.stop()
        limits.uninstall_bounded_reads()
