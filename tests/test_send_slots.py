"""Association slots per destination (dicom_node/send/slots.py): all workers together open at most
``max_associations`` to a destination; a crashed holder's slot frees itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from dicom_node.send import slots
from dicom_node.store.db import make_engine, make_sessionmaker, utcnow
from tests.support import peers
from tests.support.chest_pacs import CHEST_MODEL, CHEST_ROUTE
from tests.support.peers import NodeProcess, StoreSCP, dcmtk
from tests.support.studies import study_files

node_factory = peers.node_factory


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    yield make_sessionmaker(engine)
    engine.dispose()


def test_slots_are_taken_up_to_the_limit_and_freed(sessions: sessionmaker[Session]) -> None:
    assert slots.acquire(sessions, "pacs", 2, "w1") == 0
    assert slots.acquire(sessions, "pacs", 2, "w2") == 1
    assert slots.acquire(sessions, "pacs", 2, "w3") is None
    assert slots.acquire(sessions, "other", 2, "w3") == 0  # limits are per destination
    with sessions() as session:
        assert slots.held(session, "pacs") == 2
    slots.release(sessions, "pacs", 0, "w2")  # not its slot: nothing happens
    assert slots.acquire(sessions, "pacs", 2, "w3") is None
    slots.release(sessions, "pacs", 0, "w1")
    assert slots.acquire(sessions, "pacs", 2, "w3") == 0


def test_a_crashed_holders_slot_is_free_when_its_lease_ends(
        sessions: sessionmaker[Session]) -> None:
    assert slots.acquire(sessions, "pacs", 1, "crashed") == 0
    assert slots.acquire(sessions, "pacs", 1, "w2") is None
    later = utcnow() + timedelta(seconds=slots.LEASE_SECONDS + 1)
    assert slots.acquire(sessions, "pacs", 1, "w2", now=later) == 0
    assert not slots.renew(sessions, "pacs", 0, "crashed")  # it lost the slot
    assert slots.renew(sessions, "pacs", 0, "w2")


def test_a_lower_limit_uses_only_the_lower_slots(sessions: sessionmaker[Session]) -> None:
    assert [slots.acquire(sessions, "pacs", 3, f"w{i}") for i in range(3)] == [0, 1, 2]
    slots.release(sessions, "pacs", 2, "w2")
    assert slots.acquire(sessions, "pacs", 2, "w3") is None  # slot 2 is beyond the new limit


def check_workers_never_exceed_the_limit(sessions: sessionmaker[Session], limit: int = 2,
                                          workers: int = 6) -> None:
    """``workers`` threads, each with its own holder name, hold a slot for a moment; never more
    than ``limit`` at once, and every one gets its turn."""
    lock = threading.Lock()
    inside, most, turns = 0, 0, 0
    start = threading.Barrier(workers)

    def work(index: int) -> None:
        nonlocal inside, most, turns
        start.wait()
        with slots.send_slot(sessions, "pacs", limit, f"worker-{index}"):
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.15)
            with lock:
                inside -= 1
                turns += 1

    with capture_logs() as logs, ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(work, i) for i in range(workers)]:
            future.result(timeout=60)
    assert (most, turns) == (limit, workers)
    waiting = [e for e in logs if e["event"] == "send_waiting"]
    assert waiting and all(e["max_associations"] == limit for e in waiting)
    with sessions() as session:
        assert slots.held(session, "pacs") == 0


def test_workers_sending_at_once_take_turns(sessions: sessionmaker[Session],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots, "POLL_SECONDS", 0.02)
    check_workers_never_exceed_the_limit(sessions)


def test_a_slot_is_renewed_while_its_holder_sends(sessions: sessionmaker[Session],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots, "LEASE_SECONDS", 0.3)
    with slots.send_slot(sessions, "pacs", 1, "slow"):
        time.sleep(0.7)  # more than two leases
        assert slots.acquire(sessions, "pacs", 1, "other") is None
    assert slots.acquire(sessions, "pacs", 1, "other") == 0


@pytest.mark.slow
@pytest.mark.parametrize("max_associations", [1, 2])
def test_two_workers_open_at_most_max_associations_to_a_slow_pacs(
        max_associations: int, node_factory: Callable[..., NodeProcess],
        tmp_path: Path) -> None:
    # DCMTK storescp forking a process per association (so it could take both at once) and
    # sleeping during each store: a PACS under load.
    with StoreSCP(tmp_path / "pacs", extra_args=["--fork", "--sleep-during", "1"]) as pacs:
        receiver = node_factory(
            "receive", models=[CHEST_MODEL], routes=[CHEST_ROUTE],
            destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                           "port": pacs.port, "max_associations": max_associations}],
            sections={"jobs": {"poll_seconds": 0.2}})
        workers = [node_factory("worker", like=receiver) for _ in range(2)]
        log = workers[0]  # the workers share one log file, worker.log
        log.wait_for_log("worker_started", count=2, timeout=60)
        for _ in range(2):  # two studies, completed in the same sweep: one job each
            _, paths = study_files(tmp_path / "in", "RG1_UNCR.dcm", count=1)
            sent = dcmtk("storescu", "-aec", receiver.ae_title, "127.0.0.1",
                         str(receiver.port), *map(str, paths))
            assert sent.returncode == 0, sent.stderr
        log.wait_for_log("job_done", count=2, timeout=120)
        story = [(e["event"], e.get("job_id"), e.get("timestamp")) for e in log.logs()
                 if e["event"].startswith(("job_", "send_", "results_"))]
        waited, taken = log.find_logs("send_waiting"), log.find_logs("send_slot_taken")
        if max_associations == 1:
            # the second worker's results were ready while the first was sending
            assert len(waited) == 1 and waited[0]["max_associations"] == 1, story
            assert len(taken) == 1 and taken[0]["waited_seconds"] > 0, story
        else:
            assert waited == [] and taken == [], story
        assert len(log.find_logs("job_started")) == 2, story  # no retry
        assert len(pacs.files()) == 2, pacs.files()
