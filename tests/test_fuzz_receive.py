"""Hypothesis over encoded data sets, into the real receiver over real loopback associations.

Each example is a short series of CT instances, some of them broken on the wire: an element with
a wrong VR, a length that does not fit its value, sequences nested up to thousands of levels
deep, a missing UID, a data set cut short. Whatever the mix, these must hold:

* the receiver answers every C-STORE (a status, no hang, no aborted association);
* every Success is indexed, and after a completion sweep its study has left ``receiving``
  (processed, or failed with its unreadable instances set aside), with no traceback logged;
* nothing is written outside ``data_dir``, and ``incoming/`` is empty after each association;
* the receiving process's memory stays bounded over all the examples.

The search is repeatable: a fixed number of examples, derandomized, no example database.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from structlog.testing import capture_logs

from dicom_node import complete
from dicom_node.receive.scp import Receiver
from dicom_node.receive.status import StoreStatus
from dicom_node.store.db import Instance, Study, utcnow
from dicom_node.store.index import PROCESSED_STATES
from tests.conftest import running_receiver
from tests.support.chest_pacs import routed_config
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

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

#: Elements a fault is put in: before (0020,000E), where the receiver reads, and after it.
TARGETS = ["SOPClassUID", "StudyDate", "Modality", "Manufacturer", "ReferencedStudySequence",
           "PatientName", "SliceThickness", "StudyInstanceUID", "SeriesInstanceUID",
           "InstanceNumber", "ImagePositionPatient", "Rows", "BitsAllocated",
           "RequestAttributesSequence"]
VRS = ["FD", "FL", "US", "UL", "SS", "SL", "AT", "DA", "UI", "DS", "IS", "SQ", "OB", "UN", "UT",
       "PN", "LO"]
UIDS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]

wrong_vr = st.tuples(st.just("wrong_vr"), st.sampled_from(TARGETS), st.sampled_from(VRS),
                     st.binary(max_size=40))
bad_length = st.tuples(st.just("bad_length"), st.sampled_from(TARGETS), st.sampled_from(VRS),
                       st.binary(max_size=24), st.integers(0, 0xFFFFFFFF))
deep = st.tuples(st.just("deep"),
                 st.sampled_from(["ReferencedStudySequence", "RequestAttributesSequence"]),
                 st.integers(1, 6000))
missing = st.tuples(st.just("missing"), st.sampled_from(UIDS))
truncated = st.tuples(st.just("truncated"), st.floats(0.0, 1.0))
fault = st.one_of(wrong_vr, bad_length, deep, missing, truncated)
#: A series of 1 to 4 instances, each with no fault or up to two.
series = st.lists(st.lists(fault, max_size=2), min_size=1, max_size=4)


def apply(encoded: Encoded, faults: list[tuple[Any, ...]]) -> None:
    for kind, *args in faults:
        if kind == "wrong_vr":
            target, vr, value = args
            encoded.replace(target, raw_element(tag_of(target), vr, value))
        elif kind == "bad_length":
            target, vr, value, length = args
            encoded.replace(target, raw_element(tag_of(target), vr, value, length))
        elif kind == "deep":
            target, depth = args
            encoded.replace(target, nested_sequence(tag_of(target), depth))
        elif kind == "missing":
            encoded.drop(args[0])
        else:
            encoded.cut_at = int(len(encoded.dataset_bytes()) * args[0])


def rss_mb() -> float:
    """The resident set of this process (the receiver runs in it), from /proc."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class Fuzzing:
    """The receiver under test and what the examples have seen, across examples."""

    def __init__(self, rx: Receiver, root: Path) -> None:
        self.rx = rx
        self.root = root
        self.n = 0
        self.statuses: list[int | None] = []
        self.rss: list[float] = []


@pytest.fixture(scope="module")
def fuzzing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzing]:
    root = tmp_path_factory.mktemp("fuzz")
    with running_receiver(routed_config(root)) as rx:
        yield Fuzzing(rx, root)


def _outside_data_dir(root: Path, data_dir: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()
            and not p.is_relative_to(data_dir) and not p.is_relative_to(root / "sent")
            and p.name != "config.toml"]


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(series=series)
def test_every_success_is_indexed_and_its_study_leaves_receiving(
        fuzzing: Fuzzing, series: list[list[tuple[Any, ...]]]) -> None:
    rx, config = fuzzing.rx, fuzzing.rx.context.config
    fuzzing.n += 1
    key = f"{UID_ROOT}.900.{fuzzing.n}"
    study_uid, series_uid = f"{key}.1", f"{key}.2"
    sent = fuzzing.root / "sent" / str(fuzzing.n)
    sent.mkdir(parents=True)
    files = []
    for k, faults in enumerate(series):
        encoded = encode(instance("CT_small.dcm", study_uid, series_uid, f"{key}.3.{k}"))
        apply(encoded, faults)
        files.append(encoded.write(sent / f"{k}.dcm"))
    with capture_logs() as logs:
        statuses = send_raw(rx.port, files)
        assert None not in statuses, "a C-STORE got no response"
        assert set(statuses) <= set(StoreStatus)
        succeeded = {f"{key}.3.{k}" for k, s in enumerate(statuses) if s == StoreStatus.SUCCESS}
        complete.sweep(config, rx.context.sessions, now=utcnow() + timedelta(seconds=30))
    fuzzing.statuses += statuses
    with rx.context.sessions() as session:
        indexed = set(session.scalars(select(Instance.sop_instance_uid)
                                      .where(Instance.sop_instance_uid.in_(succeeded))))
        assert indexed == succeeded
        state = session.scalar(select(Study.state).where(Study.study_instance_uid == study_uid))
    if succeeded:
        assert state in PROCESSED_STATES, state  # routed, unrouted, or failed: all set aside
    assert not [e for e in logs if "exc_info" in e], [e["event"] for e in logs if "exc_info" in e]
    assert not [p for p in config.incoming_dir.rglob("*") if p.is_file()]
    assert _outside_data_dir(fuzzing.root, config.node.data_dir) == []
    fuzzing.rss.append(rss_mb())


def test_memory_stayed_bounded_over_the_examples(fuzzing: Fuzzing) -> None:
    """Runs after the search (same module): the growth from the first example to the last."""
    assert len(fuzzing.rss) >= 20
    assert max(fuzzing.rss) - fuzzing.rss[0] < 200, fuzzing.rss
    assert StoreStatus.SUCCESS in fuzzing.statuses
    assert set(fuzzing.statuses) - {StoreStatus.SUCCESS}, "no example was refused"
