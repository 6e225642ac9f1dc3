"""Adaptive polling of pynetdicom's reactors: fast only while an association stores instances."""

from __future__ import annotations

import inspect
import time

import pynetdicom.association
import pynetdicom.dul
from pydicom import dcmread
from pynetdicom import AE

from dicom_node.receive import polling
from dicom_node.receive.scp import Receiver
from tests.conftest import sample_file


def test_pynetdicom_reactors_still_poll_with_the_sleeps_this_module_shortens() -> None:
    # If a pynetdicom upgrade changes these loops, dicom_node/receive/polling.py must be revisited.
    dul_loop = inspect.getsource(pynetdicom.dul.DULServiceProvider.run_reactor)
    assoc_loop = inspect.getsource(pynetdicom.association.Association._run_reactor)
    assert "time.sleep(self._run_loop_delay)" in dul_loop
    assert "time.sleep(0.001)" in assoc_loop


def test_a_storing_association_polls_fast_and_is_forgotten_when_it_ends(
        receiver: Receiver) -> None:
    assert isinstance(pynetdicom.dul.time, polling._ReactorClock)
    assert isinstance(pynetdicom.association.time, polling._ReactorClock)
    ds = dcmread(sample_file("CT_small.dcm"))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0
    busy = [until for until in polling._busy_until.values() if until > time.monotonic()]
    assert len(busy) == 2  # the acceptor's association thread and its DUL thread
    assoc.release()
    deadline = time.monotonic() + 5
    while polling._busy_until and time.monotonic() < deadline:
        time.sleep(0.05)
    assert polling._busy_until == {}


def test_an_idle_thread_sleeps_as_long_as_pynetdicom_asks() -> None:
    polling.install()
    clock = pynetdicom.dul.time
    start = time.perf_counter()
    for _ in range(20):
        clock.sleep(0.001)
    assert time.perf_counter() - start >= 0.02
