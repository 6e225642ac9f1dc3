"""DICOM TLS with real peers on loopback: DCMTK's storescu and echoscu against the node's TLS
listener, the node sending to Orthanc with DICOM TLS on (and Orthanc sending to the node), the
worklist queried over TLS from Orthanc's Modality Worklists plugin, the handshake deadline, the
config checks of the certificate files, reload, and ``doctor``. The certificates come from a
throwaway CA (tests/support/tls_certs.py)."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from dicom_node import cli
from dicom_node.config import Config, load_config
from dicom_node.doctor import check_tls
from dicom_node.errors import ConfigError, SendError, WorklistError
from dicom_node.receive import limits
from dicom_node.receive.scp import Receiver
from dicom_node.reload import ConfigWatcher
from dicom_node.send.scu import echo, send_files
from dicom_node.worklist.query import query_worklist
from tests.conftest import running_receiver, sample_file
from tests.support.metrics import refused
from tests.support.peers import OrthancServer, OrthancTls, dcmtk, free_port, to_toml, wait_until
from tests.support.tls_certs import Issued, TestCA, write_encrypted_key
from tests.support.worklist_peer import worklist_item_dump, write_worklist_file

AET = "DICOM_NODE"
Logs = list[MutableMapping[str, Any]]


@dataclass(frozen=True)
class Pki:
    ca: TestCA
    node: Issued          # the node's certificate (server and client)
    modality: Issued      # a modality's client certificate
    pacs: Issued          # Orthanc's certificate
    stranger: Issued      # issued by another CA
    other_ca: TestCA


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = TestCA(folder / "ca"), TestCA(folder / "other", "Other CA")
    return Pki(ca, ca.issue("dicom-node"), ca.issue("ct-scanner"), ca.issue("orthanc"),
               other.issue("stranger"), other)


def _events(logs: Logs, name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def _write(folder: Path, document: dict[str, Any]) -> Path:
    path = folder / "config.toml"
    path.write_text(to_toml(document), encoding="utf-8")
    return path


def _node_document(pki: Pki, tls: dict[str, Any] | None = None,
                   **node: Any) -> dict[str, Any]:
    table = {"port": free_port(), "certificate": pki.node.certificate,
             "private_key": pki.node.private_key, "ca_certificates": pki.ca.certificate,
             **(tls or {})}
    return {"node": {"ae_title": AET, "port": free_port(), "bind": "127.0.0.1",
                     "data_dir": "var", "tls": table, **node}}


def _tls_config(tmp_path: Path, pki: Pki, tls: dict[str, Any] | None = None,
                **node: Any) -> Config:
    return load_config(_write(tmp_path, _node_document(pki, tls, **node)))


@contextmanager
def _tls_receiver(config: Config) -> Iterator[Receiver]:
    try:
        with running_receiver(config) as rx:
            yield rx
    finally:
        limits.uninstall_bounded_reads()


@pytest.fixture
def tls_receiver(tmp_path: Path, pki: Pki) -> Iterator[Receiver]:
    """The node's receiver with TLS only, client certificates required, 2 s handshake deadline."""
    with _tls_receiver(_tls_config(tmp_path, pki, acse_timeout_seconds=2)) as rx:
        yield rx


def _echoscu(port: int, *tls_args: str | Path) -> subprocess.CompletedProcess[str]:
    return dcmtk("echoscu", "-aec", AET, *tls_args, "127.0.0.1", str(port), timeout=30)


def _client_tls(issued: Issued, ca: Path) -> tuple[str | Path, ...]:
    return ("+tls", issued.private_key, issued.certificate, "+cf", ca)


def _spool_files(rx: Receiver) -> list[Path]:
    return sorted(rx.context.config.spool_dir.rglob("*.dcm"))


# --------------------------------------------------------------------------------------------
# the receiver and DCMTK


def test_storescu_over_tls_stores_the_instances_and_the_log_names_the_tls_session(
        tls_receiver: Receiver, pki: Pki) -> None:
    with capture_logs() as logs:
        sent = dcmtk("storescu", "-aec", AET, *_client_tls(pki.modality, pki.ca.certificate),
                     "127.0.0.1", str(tls_receiver.tls_port), sample_file("CT_small.dcm"),
                     sample_file("MR_small.dcm"))
    assert sent.returncode == 0, sent.stderr
    assert len(_spool_files(tls_receiver)) == 2
    [accepted] = _events(logs, "association_accepted")
    assert accepted["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert accepted["tls_cipher"]
    assert accepted["client_certificate"] == pki.modality.subject
    assert _events(logs, "association_closed")[0]["instances_stored"] == 2


def test_echo_is_answered_on_the_tls_port_and_on_the_plain_port_when_plain_tcp_stays_open(
        tmp_path: Path, pki: Pki) -> None:
    config = _tls_config(tmp_path, pki, {"plain_tcp": True})
    assert config.node.tls is not None
    with _tls_receiver(config) as rx:
        assert (rx.port, rx.tls_port) == (config.node.port, config.node.tls.port)
        tls_echo = _echoscu(rx.tls_port, *_client_tls(pki.modality, pki.ca.certificate))
        plain_echo = _echoscu(rx.port)
    assert tls_echo.returncode == 0, tls_echo.stderr
    assert plain_echo.returncode == 0, plain_echo.stderr


def test_a_client_without_a_certificate_is_refused_when_one_is_required(
        tls_receiver: Receiver, pki: Pki) -> None:
    with capture_logs() as logs:
        anonymous = _echoscu(tls_receiver.tls_port, "+tla", "+cf", pki.ca.certificate)
    assert anonymous.returncode != 0
    [failed] = _events(logs, "tls_handshake_failed")
    assert failed["peer"] == "127.0.0.1"
    assert "did not return a certificate" in failed["reason"]
    assert not _events(logs, "association_accepted")
    assert refused(tls_receiver, "tls_handshake") == 1


def test_a_client_certificate_from_another_ca_is_refused(tls_receiver: Receiver,
                                                          pki: Pki) -> None:
    with capture_logs() as logs:
        stranger = _echoscu(tls_receiver.tls_port, *_client_tls(pki.stranger, pki.ca.certificate))
    assert stranger.returncode != 0
    [failed] = _events(logs, "tls_handshake_failed")
    assert "certificate verify failed" in failed["reason"]


def test_a_client_that_does_not_trust_the_node_certificate_does_not_associate(
        tls_receiver: Receiver, pki: Pki) -> None:
    with capture_logs() as logs:
        wary = _echoscu(tls_receiver.tls_port,
                        *_client_tls(pki.modality, pki.other_ca.certificate))
    assert wary.returncode != 0
    assert not _events(logs, "association_accepted")
    wait_until(lambda: bool(_events(logs, "tls_handshake_failed")), 5, "the failure logged")


def test_plain_dicom_to_the_tls_port_is_refused_cleanly_and_tls_keeps_working(
        tls_receiver: Receiver, pki: Pki) -> None:
    with capture_logs() as logs:
        plain = _echoscu(tls_receiver.tls_port)
    assert plain.returncode != 0
    [failed] = _events(logs, "tls_handshake_failed")
    assert failed["reason"].startswith("not a TLS client")
    again = _echoscu(tls_receiver.tls_port, *_client_tls(pki.modality, pki.ca.certificate))
    assert again.returncode == 0, again.stderr


def test_a_client_without_a_certificate_is_accepted_when_none_is_required(
        tmp_path: Path, pki: Pki) -> None:
    config = _tls_config(tmp_path, pki, {"require_client_certificate": False})
    with capture_logs() as logs, _tls_receiver(config) as rx:
        anonymous = _echoscu(rx.tls_port, "+tla", "+cf", pki.ca.certificate)
    assert anonymous.returncode == 0, anonymous.stderr
    assert _events(logs, "association_accepted")[0]["client_certificate"] is None


# --------------------------------------------------------------------------------------------
# bounded resources: the handshake deadline and the connection cap


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_a_silent_connection_does_not_block_the_tls_listener_and_is_dropped_at_the_deadline(
        tls_receiver: Receiver, pki: Pki) -> None:
    with capture_logs() as logs, socket.create_connection(
            ("127.0.0.1", tls_receiver.tls_port)) as silent:
        opened = time.monotonic()
        echo_tls = _echoscu(tls_receiver.tls_port, *_client_tls(pki.modality, pki.ca.certificate))
        answered = time.monotonic() - opened
        assert echo_tls.returncode == 0, echo_tls.stderr
        assert answered < 1.5  # well before the silent connection's 2 s deadline
        assert not _closed_by_peer(silent, within=0.1)  # still open while the echo went through
        assert _closed_by_peer(silent, within=4)
        dropped = time.monotonic() - opened
    assert 1.8 < dropped < 3.5
    [failed] = _events(logs, "tls_handshake_failed")
    assert failed["reason"] == "no TLS handshake within 2 s"
    assert failed["peer"] == "127.0.0.1"


def _client_hello() -> bytes:
    """The first flight of a real TLS client, made in memory."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def test_a_handshake_sent_a_byte_at_a_time_is_cut_off_at_one_deadline(
        tls_receiver: Receiver) -> None:
    hello = _client_hello()
    assert len(hello) > 40  # a byte every 0.2 s: 8 s and more, were the deadline per read
    with socket.create_connection(("127.0.0.1", tls_receiver.tls_port)) as sock:
        start = time.monotonic()
        for byte in hello:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if _closed_by_peer(sock, within=0.2):
                break
        cut_off = time.monotonic() - start
    assert cut_off < 3.5  # acse_timeout_seconds = 2 for the whole handshake


def test_connections_still_in_their_handshake_count_towards_max_connections(
        tmp_path: Path, pki: Pki) -> None:
    config = _tls_config(tmp_path, pki, max_connections=2, acse_timeout_seconds=5)
    with _tls_receiver(config) as rx, capture_logs() as logs:
        silent = [socket.create_connection(("127.0.0.1", rx.tls_port)) for _ in range(2)]
        try:
            time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", rx.tls_port)) as extra:
                assert _closed_by_peer(extra, within=2)
        finally:
            for sock in silent:
                sock.close()
    assert _events(logs, "connection_refused")


def _tls_client(port: int, pki: Pki) -> ssl.SSLSocket:
    """A TLS connection to the node as the modality, handshake done."""
    context = ssl.create_default_context(cafile=pki.ca.certificate)
    context.load_cert_chain(pki.modality.certificate, pki.modality.private_key)
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                               server_hostname="localhost")


def test_the_bounded_pdu_read_holds_over_tls(tls_receiver: Receiver, pki: Pki) -> None:
    with capture_logs() as logs, _tls_client(tls_receiver.tls_port, pki) as sock:
        sock.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFF0) + b"\x00" * 64)
        assert _closed_by_peer(sock, within=5)
    assert _events(logs, "pdu_refused")


# --------------------------------------------------------------------------------------------
# configuration: checked when loaded, and on reload


def _config_error(tmp_path: Path, document: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, document))
    return str(caught.value)


def test_unusable_tls_files_are_refused_with_the_key_and_the_problem(
        tmp_path: Path, pki: Pki) -> None:
    missing = _config_error(tmp_path, _node_document(pki, {"certificate": "no-such.crt"}))
    assert "node.tls: certificate" in missing and "no-such.crt: cannot read" in missing
    mismatch = _config_error(tmp_path, _node_document(
        pki, {"private_key": pki.modality.private_key}))
    assert "node.tls: private_key" in mismatch and "does not belong to certificate" in mismatch
    encrypted = write_encrypted_key(pki.node, tmp_path / "encrypted.key")
    locked = _config_error(tmp_path, _node_document(pki, {"private_key": encrypted}))
    assert "the key is encrypted" in locked
    not_pem = _config_error(tmp_path, _node_document(pki, {"ca_certificates": encrypted}))
    assert "node.tls: ca_certificates" in not_pem and "no PEM certificate" in not_pem
    no_ca = _node_document(pki)
    del no_ca["node"]["tls"]["ca_certificates"]
    assert "require_client_certificate = true needs ca_certificates" in _config_error(
        tmp_path, no_ca)
    same_port = _node_document(pki, {"plain_tcp": True})
    same_port["node"]["tls"]["port"] = same_port["node"]["port"]
    assert "give TLS its own port" in _config_error(tmp_path, same_port)
    half = {"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104,
                              "tls": {"certificate": pki.node.certificate}}]}
    assert "destinations[0].tls: certificate and private_key go together" in _config_error(
        tmp_path, half)


def test_relative_tls_paths_are_relative_to_the_config_file(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "tls").mkdir()
    for name, source in (("node.crt", pki.node.certificate), ("node.key", pki.node.private_key),
                         ("ca.crt", pki.ca.certificate)):
        (tmp_path / "tls" / name).write_bytes(source.read_bytes())
    config = _tls_config(tmp_path, pki, {"certificate": "tls/node.crt",
                                         "private_key": "tls/node.key",
                                         "ca_certificates": "tls/ca.crt"})
    assert config.node.tls is not None
    assert config.node.tls.certificate == tmp_path / "tls" / "node.crt"


def _served_subject(port: int, pki: Pki) -> str:
    with _tls_client(port, pki) as sock:
        cert = sock.getpeercert()
    return ",".join(f"{k}={v}" for rdn in cert["subject"] for k, v in rdn)


def test_reload_serves_a_renewed_certificate_and_refuses_a_broken_one(
        tmp_path: Path, pki: Pki) -> None:
    document = _node_document(pki)
    config = load_config(_write(tmp_path, document))
    with _tls_receiver(config) as rx, capture_logs() as logs:
        watcher = ConfigWatcher(config, rx.reconfigure)
        assert "commonName=dicom-node" in _served_subject(rx.tls_port, pki)

        renewed = pki.ca.issue("dicom-node-renewed")
        document["node"]["tls"].update(certificate=renewed.certificate,
                                       private_key=renewed.private_key)
        _write(tmp_path, document)
        assert watcher.check()
        assert _events(logs, "tls_reloaded")[0]["certificate"] == renewed.subject
        assert "commonName=dicom-node-renewed" in _served_subject(rx.tls_port, pki)

        document["node"]["tls"]["private_key"] = pki.node.private_key  # not the renewed key
        _write(tmp_path, document)
        assert not watcher.check()
        [rejected] = _events(logs, "config_rejected")
        assert "node.tls: private_key" in rejected["reason"]
        assert "commonName=dicom-node-renewed" in _served_subject(rx.tls_port, pki)
        echo_tls = _echoscu(rx.tls_port, *_client_tls(pki.modality, pki.ca.certificate))
        assert echo_tls.returncode == 0, echo_tls.stderr

        document["node"]["tls"].update(certificate=renewed.certificate,
                                       private_key=renewed.private_key, port=free_port())
        _write(tmp_path, document)
        assert watcher.check()
        assert "tls.port" in _events(logs, "restart_required")[0]["reason"]
        assert config.node.tls is not None and rx.tls_port == config.node.tls.port


# --------------------------------------------------------------------------------------------
# sending: the node to Orthanc with DICOM TLS on, and Orthanc to the node


def _orthanc_tls(pki: Pki, required: bool = True) -> OrthancTls:
    return OrthancTls(pki.pacs.certificate, pki.pacs.private_key, pki.ca.certificate, required)


def _destination_config(tmp_path: Path, orthanc: OrthancServer,
                        tls: dict[str, Any]) -> Config:
    return load_config(_write(tmp_path, {
        "node": {"ae_title": AET, "port": free_port(), "data_dir": "var"},
        "destinations": [{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                          "port": orthanc.dicom_port, "timeout_seconds": 5, "tls": tls}]}))


def test_the_node_echoes_and_sends_to_orthanc_over_tls_with_its_certificate(
        orthanc_factory: Callable[..., OrthancServer], tmp_path: Path, pki: Pki,
        capsys: pytest.CaptureFixture[str]) -> None:
    orthanc = orthanc_factory(tls=_orthanc_tls(pki))
    config = _destination_config(tmp_path, orthanc, {
        "ca_certificates": pki.ca.certificate, "certificate": pki.node.certificate,
        "private_key": pki.node.private_key})
    assert cli.main(["echo", "pacs", "--config", str(config.source)]) == 0
    assert "over TLS): C-ECHO status 0x0000" in capsys.readouterr().out
    files = [sample_file("CT_small.dcm"), sample_file("MR_small.dcm")]
    report = send_files(config.destination("pacs"), files, AET)
    assert (report.sent, report.failed) == (2, ())
    assert orthanc.instance_count() == 2


def test_orthanc_refuses_the_node_without_a_client_certificate_and_the_node_an_unknown_pacs(
        orthanc_factory: Callable[..., OrthancServer], tmp_path: Path, pki: Pki) -> None:
    orthanc = orthanc_factory(tls=_orthanc_tls(pki))
    no_certificate = _destination_config(tmp_path, orthanc, {
        "ca_certificates": pki.ca.certificate})
    with pytest.raises(SendError, match=r"over TLS: association aborted while it was negotiated"
                       r".*often the peer refusing the node's certificate or its absence"):
        echo(no_certificate.destination("pacs"), AET)
    distrustful = _destination_config(tmp_path, orthanc, {
        "ca_certificates": pki.other_ca.certificate, "certificate": pki.node.certificate,
        "private_key": pki.node.private_key})
    with pytest.raises(SendError, match=r"over TLS: cannot connect: \[SSL: "
                                        r"CERTIFICATE_VERIFY_FAILED\] certificate verify failed"):
        echo(distrustful.destination("pacs"), AET)
    assert orthanc.instance_count() == 0


def test_verify_hostname_checks_the_name_in_the_peer_certificate_and_can_be_turned_off(
        tmp_path: Path, pki: Pki) -> None:
    elsewhere = pki.ca.issue("pacs-by-name", hosts=("pacs.example.org",))
    receiver_dir, sender_dir = tmp_path / "receiver", tmp_path / "sender"
    receiver_dir.mkdir()
    sender_dir.mkdir()
    config = _tls_config(receiver_dir, pki, {
        "certificate": elsewhere.certificate, "private_key": elsewhere.private_key,
        "require_client_certificate": False})
    with _tls_receiver(config) as rx:
        def destination(verify: bool) -> Any:
            return load_config(_write(sender_dir, {"destinations": [{
                "name": "self", "ae_title": AET, "host": "127.0.0.1", "port": rx.tls_port,
                "timeout_seconds": 5, "tls": {"ca_certificates": pki.ca.certificate,
                                              "verify_hostname": verify}}]})
            ).destination("self")

        with pytest.raises(SendError):
            echo(destination(True), "SENDER")
        assert echo(destination(False), "SENDER") == 0


def test_orthanc_sends_to_the_node_tls_listener_with_its_certificate(
        orthanc_factory: Callable[..., OrthancServer], tmp_path: Path, pki: Pki) -> None:
    with _tls_receiver(_tls_config(tmp_path, pki)) as rx, capture_logs() as logs:
        orthanc = orthanc_factory(tls=_orthanc_tls(pki), modalities={"node": {
            "AET": AET, "Host": "127.0.0.1", "Port": rx.tls_port, "UseDicomTls": True}})
        uploaded = orthanc.upload(sample_file("CT_small.dcm"))
        orthanc.post("/modalities/node/store", {"Resources": [uploaded["ID"]],
                                                "Synchronous": True})
        assert len(_spool_files(rx)) == 1
    [accepted] = _events(logs, "association_accepted")
    assert accepted["client_certificate"] == pki.pacs.subject


# --------------------------------------------------------------------------------------------
# the worklist over TLS (Orthanc's Modality Worklists plugin; DCMTK 3.6.7's wlmscpfs has no TLS)


def test_the_worklist_is_queried_over_tls_and_an_untrusted_ris_is_named_as_the_reason(
        orthanc_factory: Callable[..., OrthancServer], tmp_path: Path, pki: Pki) -> None:
    worklists = tmp_path / "worklists"
    write_worklist_file(worklists, "chest", worklist_item_dump(
        accession="ACC_TLS", day=date.today()), tmp_path / "dumps")
    orthanc = orthanc_factory(tls=_orthanc_tls(pki), worklists=worklists)

    def section(ca: Path) -> Any:
        return load_config(_write(tmp_path, {"worklist": {
            "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port,
            "timeout_seconds": 5, "tls": {"ca_certificates": ca,
                                          "certificate": pki.node.certificate,
                                          "private_key": pki.node.private_key}}})).worklist

    [item] = query_worklist(section(pki.ca.certificate), AET)
    assert item.AccessionNumber == "ACC_TLS"
    assert "PatientName" not in item
    with pytest.raises(WorklistError) as caught:
        query_worklist(section(pki.other_ca.certificate), AET)
    assert "over TLS" in str(caught.value)
    assert "certificate verify failed" in caught.value.reason


# --------------------------------------------------------------------------------------------
# doctor


def test_doctor_shows_tls_and_warns_before_a_certificate_expires(tmp_path: Path,
                                                                 pki: Pki) -> None:
    soon = pki.ca.issue("expires-soon", days=10)
    expired = pki.ca.issue("expired", expired=True)
    plain = load_config(_write(tmp_path, {"node": {"port": 11112}}))
    assert [(c.status, c.detail.split(":")[0]) for c in check_tls(plain)] == [("ok", "off")]

    def receiver_check(issued: Issued) -> Any:
        [check] = check_tls(_tls_config(tmp_path, pki, {
            "certificate": issued.certificate, "private_key": issued.private_key}))
        return check

    good = receiver_check(pki.node)
    assert good.status == "ok" and "client certificates required" in good.detail
    assert receiver_check(soon).status == "warn"
    assert "CN=expires-soon" in receiver_check(soon).detail
    assert receiver_check(expired).status == "FAIL"
    assert "EXPIRED" in receiver_check(expired).detail
    sender = load_config(_write(tmp_path, {"destinations": [{
        "name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 2762,
        "tls": {"ca_certificates": pki.ca.certificate, "certificate": soon.certificate,
                "private_key": soon.private_key, "verify_hostname": False}}]}))
    [_receiver, destination] = check_tls(sender)
    assert destination.name == "tls destination pacs" and destination.status == "warn"
    assert "host name NOT checked" in destination.detail
