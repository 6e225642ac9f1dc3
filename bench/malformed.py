"""How many malformed inputs per second does the receiver refuse, over one association?

A ``dicom-node receive`` process (fresh data folder) gets ``--count`` C-STOREs over one
association from pynetdicom, each a copy of pydicom-data's ``CT_small.dcm`` (128×128, ~39 kB)
broken in a way the receiver refuses from the header it reads (up to (0020,000E)): cycling
through no SOP Instance UID in the data set (A900), a Study Instance UID encoded as FD with a
length that is no multiple of 8, sequences nested 5000 deep before the Series UID, and a data set
cut off before its Study UID (C000). The same count of well-formed instances is sent over a second
association for comparison. The bytes are sent as they are (tests/support/malformed.py).

Run from the repository root:  .venv/bin/python -m bench.malformed [--count 400]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dicom_node.receive.status import StoreStatus
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
from tests.support.peers import NodeProcess


def _broken(kind: int, n: int) -> Encoded:
    uid = f"{UID_ROOT}.77.{n}"
    encoded = encode(instance("CT_small.dcm", f"{uid}.1", f"{uid}.2", f"{uid}.3"))
    if kind == 0:
        encoded.drop("SOPInstanceUID")
    elif kind == 1:
        encoded.replace("StudyInstanceUID",
                        raw_element(tag_of("StudyInstanceUID"), "FD", b"1" * 18))
    elif kind == 2:
        encoded.replace("ReferencedStudySequence",
                        nested_sequence(tag_of("ReferencedStudySequence"), 5000))
    else:
        head = b"".join(v for t, v in sorted(encoded.elements.items())
                        if t < tag_of("StudyInstanceUID"))
        encoded.cut_at = len(head) + 4
    return encoded


def _timed(port: int, paths: Sequence[Path]) -> tuple[float, Counter[str]]:
    start = time.perf_counter()
    statuses = send_raw(port, paths, timeout=120)
    seconds = time.perf_counter() - start
    names = Counter(StoreStatus(s).name if s is not None else "no response" for s in statuses)
    return seconds, names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400, help="C-STOREs per run (default 400)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".bench-malformed-") as tmp:
        work = Path(tmp)
        (work / "bad").mkdir()
        (work / "good").mkdir()
        bad = [_broken(n % 4, n).write(work / "bad" / f"{n}.dcm") for n in range(args.count)]
        good = [encode(instance("CT_small.dcm", f"{UID_ROOT}.78.1", f"{UID_ROOT}.78.2",
                                f"{UID_ROOT}.78.3.{n}")).write(work / "good" / f"{n}.dcm")
                for n in range(args.count)]
        node = NodeProcess(work / "node", "receive", ae_title="DICOM_NODE",
                           stable_after_seconds=3600).start()
        try:
            bad_s, bad_statuses = _timed(node.port, bad)
            good_s, good_statuses = _timed(node.port, good)
        finally:
            node.stop()
    result = {
        "count": args.count,
        "refused_per_second": round(args.count / bad_s, 1),
        "refused_statuses": dict(bad_statuses),
        "stored_per_second": round(args.count / good_s, 1),
        "stored_statuses": dict(good_statuses),
    }
    print(json.dumps(result, indent=2))
    return 0 if set(bad_statuses) <= {"DATASET_MISMATCH", "CANNOT_UNDERSTAND"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
