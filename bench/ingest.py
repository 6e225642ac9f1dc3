"""Ingest benchmark: how fast do DCMTK's storescp, Orthanc and dicom-node take in one CT series?

One corpus (default 300 CT instances of 512×512 16-bit, ~0.5 MB each, made from pydicom-data's
real head CT ``693_UNCR.dcm`` with new UIDs, one study, one series) is sent with DCMTK's
``storescu +sd +r`` over one association, ``TCP_NODELAY=1``, to each target in turn:

- ``storescp``: DCMTK's reference receiver (writes each file, no fsync): the ceiling;
- ``orthanc``:  Orthanc 1.10, what a hospital PACS / research node typically is;
- ``node``:     ``dicom-node receive`` with a fresh data folder (fsync of the file and of its
  folder, plus an SQLite commit with synchronous=FULL, before every Success);
- ``pynetdicom``: bench/bare_scp.py, the node's network stack with a handler that only renames
  the file (no parsing, fsync or index): the floor under the node. ``pynetdicom-fastpoll`` (not
  run by default) is the same with pynetdicom's 1 ms polling sleeps cut to 0.1 ms.

Every target starts fresh for every repetition (new storage folder, on the same disk as the
repository, never tmpfs), the wall time of the storescu run is measured, and the count of stored
instances is checked (files / Orthanc's REST /statistics / ``dicom-node studies --json``). The
median of the repetitions is reported, with the ratios node/storescp and node/Orthanc.

With ``--tls`` every association is DICOM TLS (TLS 1.2+, client certificates required, all
certificates from one throwaway CA): storescu ``+tls``, storescp ``+tls``, Orthanc's
``DicomTlsEnabled``, the node's ``[node.tls]`` listener; the bare pynetdicom targets have no TLS.

Run from the repository root:  .venv/bin/python -m bench.ingest [--count 300] [--repeat 3] [--tls]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.support.peers import (
    PEER_ENV,
    NodeProcess,
    OrthancServer,
    OrthancTls,
    StoreSCP,
    free_port,
    is_listening,
    require_program,
    wait_until,
)
from tests.support.tls_certs import Issued, TestCA

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out"
TARGETS = ("storescp", "orthanc", "node", "pynetdicom", "pynetdicom-fastpoll")
DEFAULT_TARGETS = ("storescp", "orthanc", "node", "pynetdicom")
#: Source images, first found wins: the real 512² head CT, else pydicom's own small CT.
SOURCES = ("693_UNCR.dcm", "CT_small.dcm")
CORPUS_VERSION = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# corpus


@dataclass(frozen=True)
class Corpus:
    folder: Path  # the instances, and nothing else (storescu +sd +r sends the whole tree)
    count: int
    total_bytes: int
    source: str
    study_instance_uid: str


def _source_file() -> tuple[str, Path]:
    for name in SOURCES:
        path = get_testdata_file(name)  # exact names only: a pattern tries to download
        if path is not None:
            return name, Path(str(path))
    raise RuntimeError(f"none of {SOURCES} found; install pydicom-data (pip install "
                       "pydicom-data)")


def build_corpus(count: int, cache_dir: Path) -> Corpus:
    """The corpus of ``count`` instances, built once under ``cache_dir`` and reused after."""
    name, source = _source_file()
    root = cache_dir / f"corpus-v{CORPUS_VERSION}-{Path(name).stem}-{count}"
    marker = root / "corpus.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        return Corpus(root / "instances", meta["count"], meta["total_bytes"], meta["source"],
                      meta["study_instance_uid"])
    shutil.rmtree(root, ignore_errors=True)
    folder = root / "instances"
    folder.mkdir(parents=True)
    template = dcmread(source)
    seed = f"dicom-node-bench-v{CORPUS_VERSION}-{name}-{count}"
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    series_uid = generate_uid(entropy_srcs=[seed, "series"])
    z0 = float(template.ImagePositionPatient[2]) if "ImagePositionPatient" in template else 0.0
    total = 0
    for i in range(count):
        ds = template.copy()
        ds.PatientName = "Bench^Ingest"
        ds.PatientID = "BENCH-INGEST"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = "dicom-node ingest benchmark"
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "instance", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        if "ImagePositionPatient" in ds:
            x, y, _ = ds.ImagePositionPatient
            ds.ImagePositionPatient = [x, y, round(z0 + i * 1.0, 3)]
            ds.SliceLocation = round(z0 + i * 1.0, 3)
        path = folder / f"{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    marker.write_text(json.dumps({"count": count, "total_bytes": total, "source": name,
                                  "study_instance_uid": study_uid}, indent=2))
    return Corpus(folder, count, total, name, study_uid)


def _warm_page_cache(corpus: Corpus) -> None:
    """Read every file once, so the first timed run does not pay for cold disk reads."""
    for path in corpus.folder.iterdir():
        path.read_bytes()


# --------------------------------------------------------------------------------------------
# one timed send


@dataclass
class Trial:
    target: str
    seconds: float
    stored: int
    #: CPU seconds (user + system) the receiving process spent during the send.
    receiver_cpu_seconds: float


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(frozen=True)
class Tls:
    """--tls: one CA; the receivers' certificate and storescu's."""

    ca: Path
    server: Issued
    client: Issued

    @classmethod
    def make(cls, folder: Path) -> Tls:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        authority = TestCA(folder, "Bench CA")
        return cls(authority.certificate, authority.issue("receiver"),
                   authority.issue("storescu"))

    @staticmethod
    def dcmtk(issued: Issued, ca: Path) -> list[str]:
        """DCMTK's options: TLS with this certificate, peers verified against ``ca``."""
        return ["+tls", str(issued.private_key), str(issued.certificate), "+cf", str(ca)]


#: Set by --tls.
TLS: Tls | None = None


def send(corpus: Corpus, port: int, called_ae: str, pid: int) -> tuple[float, float]:
    """storescu the whole corpus over one association; (wall seconds, receiver CPU seconds)."""
    argv = [require_program("storescu"), "-aet", "BENCH", "-aec", called_ae, "+sd", "+r",
            *(Tls.dcmtk(TLS.client, TLS.ca) if TLS else []),
            "127.0.0.1", str(port), str(corpus.folder)]
    cpu_before = _cpu_seconds(pid)
    started = time.perf_counter()
    done = subprocess.run(argv, env=PEER_ENV, capture_output=True, text=True, errors="replace",
                          timeout=600, check=False)
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds(pid) - cpu_before
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed ({done.returncode}):\n"
                           f"{done.stderr[-2000:]}")
    return seconds, cpu


def run_storescp(corpus: Corpus, workdir: Path) -> Trial:
    extra = [*Tls.dcmtk(TLS.server, TLS.ca), "--require-peer-cert"] if TLS else []
    with StoreSCP(workdir, extra_args=extra) as scp:
        assert scp.process is not None
        seconds, cpu = send(corpus, scp.port, scp.ae_title, scp.process.pid)
        stored = len(scp.files())
    return Trial("storescp", seconds, stored, cpu)


def run_orthanc(corpus: Corpus, workdir: Path) -> Trial:
    tls = (OrthancTls(TLS.server.certificate, TLS.server.private_key, TLS.ca)
           if TLS else None)
    server = OrthancServer(workdir, tls=tls).start()
    try:
        assert server.process is not None
        seconds, cpu = send(corpus, server.dicom_port, server.ae_title, server.process.pid)
        stored = server.instance_count()
    finally:
        server.stop(graceful=False)  # its storage is deleted next; no 3 s clean shutdown
    return Trial("orthanc", seconds, stored, cpu)


#: Set by --py-spy: a folder for py-spy's raw stacks of the node's receiver, one file per run.
PY_SPY_DIR: Path | None = None
PY_SPY_RATE = 250


def _py_spy() -> str:
    """py-spy next to this Python (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--py-spy needs py-spy: .venv/bin/pip install py-spy")
    return found


def run_node(corpus: Corpus, workdir: Path) -> Trial:
    # A stable age far beyond the run: the completion sweep must not route mid-measurement.
    sections: dict[str, dict[str, Any]] = {}
    tls_port = free_port()
    if TLS:  # plain TCP stays on too: the test helper waits for that port to listen
        sections["node"] = {"tls": {
            "port": tls_port, "certificate": str(TLS.server.certificate),
            "private_key": str(TLS.server.private_key), "ca_certificates": str(TLS.ca),
            "plain_tcp": True}}
    node = NodeProcess(workdir, "receive", ae_title="DICOM_NODE", stable_after_seconds=3600,
                       sections=sections).start()
    spy: subprocess.Popen[bytes] | None = None
    try:
        assert node.process is not None
        if PY_SPY_DIR is not None:
            PY_SPY_DIR.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen(
                [_py_spy(), "record", "--pid", str(node.process.pid),
                 "--threads", "--idle", "--rate", str(PY_SPY_RATE), "--format", "raw",
                 "-o", str(PY_SPY_DIR / f"{workdir.name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches
        if TLS:
            wait_until(lambda: is_listening(tls_port), 30, "the node's TLS port to listen")
        seconds, cpu = send(corpus, tls_port if TLS else node.port, node.ae_title,
                            node.process.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(timeout=60)
        node.wait_for_log("association_closed", timeout=30)
        studies = node.studies()
        indexed = sum(s["instances"] for s in studies
                      if s["study_instance_uid"] == corpus.study_instance_uid)
        on_disk = sum(1 for p in node.spool_dir.rglob("*.dcm") if p.is_file())
    finally:
        node.stop()
    return Trial("node", seconds, min(indexed, on_disk), cpu)


def _run_bare(corpus: Corpus, workdir: Path, target: str, extra: Sequence[str]) -> Trial:
    out = workdir / "received"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with open(workdir / "bare_scp.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_scp", str(port), str(out), *extra],
            cwd=BENCH_DIR.parent, env=PEER_ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: is_listening(port) or process.poll() is not None, 30,
                   "bench.bare_scp to listen")
        if process.poll() is not None:
            raise RuntimeError(f"bench.bare_scp exited: {(workdir / 'bare_scp.log').read_text()}")
        seconds, cpu = send(corpus, port, "BARE", process.pid)
        stored = sum(1 for p in out.glob("*.dcm"))
    finally:
        process.terminate()
        process.wait(timeout=30)
    return Trial(target, seconds, stored, cpu)


def run_pynetdicom(corpus: Corpus, workdir: Path) -> Trial:
    return _run_bare(corpus, workdir, "pynetdicom", ())


def run_pynetdicom_fastpoll(corpus: Corpus, workdir: Path) -> Trial:
    return _run_bare(corpus, workdir, "pynetdicom-fastpoll", ("--poll-seconds", "0.0001"))


def summarize_py_spy(path: Path, top: int = 25) -> list[tuple[float, str]]:
    """From py-spy's raw stacks: the share of the association threads' samples (those that run
    ``Association._run_reactor``) spent in each function, inclusive, largest first."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "Association._run_reactor" not in stack:
            continue
        total += int(count)
        for frame in {re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]}:
            if "(threading.py)" not in frame:
                inclusive[frame] += int(count)
    return [(round(100 * n / total, 1), f) for f, n in inclusive.most_common(top)] if total else []


RUNNERS: dict[str, Callable[[Corpus, Path], Trial]] = {
    "storescp": run_storescp, "orthanc": run_orthanc, "node": run_node,
    "pynetdicom": run_pynetdicom, "pynetdicom-fastpoll": run_pynetdicom_fastpoll,
}


# --------------------------------------------------------------------------------------------
# report


@dataclass
class Result:
    target: str
    runs_seconds: list[float]
    median_seconds: float
    instances_per_second: float
    megabytes_per_second: float
    receiver_cpu_ms_per_instance: float
    all_stored: bool
    stored_counts: list[int] = field(default_factory=list)


def summarize(corpus: Corpus, trials: Sequence[Trial], target: str) -> Result:
    mine = [t for t in trials if t.target == target]
    median = statistics.median(t.seconds for t in mine)
    cpu = statistics.median(t.receiver_cpu_seconds for t in mine)
    return Result(
        target=target, runs_seconds=[round(t.seconds, 3) for t in mine],
        median_seconds=round(median, 3),
        instances_per_second=round(corpus.count / median, 1),
        megabytes_per_second=round(corpus.total_bytes / median / 1e6, 1),
        receiver_cpu_ms_per_instance=round(cpu / corpus.count * 1000, 2),
        all_stored=all(t.stored == corpus.count for t in mine),
        stored_counts=[t.stored for t in mine])


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release()}


def print_table(corpus: Corpus, results: dict[str, Result], ratios: dict[str, float]) -> None:
    info = machine()
    print(f"corpus: {corpus.count} × {corpus.source} ({corpus.total_bytes / 1e6:.1f} MB), "
          f"storescu +sd +r, one association, TCP_NODELAY=1"
          f"{', DICOM TLS' if TLS else ''}; "
          f"{info['cores']} cores ({info['cpu']})")
    header = (f"{'target':<20} {'inst/s':>8} {'MB/s':>7} {'median s':>9} "
              f"{'rx CPU ms/inst':>15}  {'stored':<8} runs (s)")
    print(header)
    print("-" * len(header))
    for r in results.values():
        stored = "all" if r.all_stored else "MISSING"
        print(f"{r.target:<20} {r.instances_per_second:>8.1f} {r.megabytes_per_second:>7.1f} "
              f"{r.median_seconds:>9.3f} {r.receiver_cpu_ms_per_instance:>15.2f}  {stored:<8} "
              f"{', '.join(f'{s:.2f}' for s in r.runs_seconds)}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}" + ("   (target ≥ 1.0)" if name == "node/orthanc" else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300, help="instances (default 300)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per target; the median is reported (default 3)")
    parser.add_argument("--targets", default=None,
                        help=f"comma-separated, from {','.join(TARGETS)} "
                             f"(default {','.join(DEFAULT_TARGETS)}; with --tls without "
                             "the pynetdicom ones)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="corpus cache and scratch folder (default bench/out; keep it on "
                             "a real disk, not tmpfs, or fsync costs nothing)")
    parser.add_argument("--keep", action="store_true", help="keep each run's storage folder")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="profile the node's receiver with py-spy (pip install py-spy) during "
                             "each send; raw stacks to DIR, a summary printed (slows the node)")
    parser.add_argument("--tls", action="store_true",
                        help="DICOM TLS on every association (targets storescp, orthanc, node)")
    args = parser.parse_args(argv)
    global PY_SPY_DIR, TLS
    PY_SPY_DIR = args.py_spy.resolve() if args.py_spy else None
    default = ",".join(t for t in DEFAULT_TARGETS if not (args.tls and t.startswith("pynet")))
    targets = [t.strip() for t in (args.targets or default).split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or args.count < 1 or args.repeat < 1:
        parser.error(f"unknown target(s) {unknown}" if unknown else "count/repeat must be ≥ 1")
    if args.tls and any(t.startswith("pynetdicom") for t in targets):
        parser.error("--tls: the pynetdicom targets (bench/bare_scp.py) have no TLS")
    TLS = Tls.make(args.out / "pki") if args.tls else None

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        log(f"warning: 1-minute load average is {load_before:.2f}: other work on this machine "
            "will slow the targets (the node most: it needs the most CPU per instance)")
    started = time.monotonic()
    corpus = build_corpus(args.count, args.out)
    _warm_page_cache(corpus)
    log(f"corpus ready in {time.monotonic() - started:.1f} s: {corpus.folder}")
    scratch = args.out / "runs"
    shutil.rmtree(scratch, ignore_errors=True)
    trials: list[Trial] = []
    for rep in range(args.repeat):  # interleaved, so drift hits every target alike
        for target in targets:
            workdir = scratch / f"{target}-{rep + 1}"
            trial = RUNNERS[target](corpus, workdir)
            trials.append(trial)
            log(f"  run {rep + 1}/{args.repeat} {target:<9} {trial.seconds:6.3f} s  "
                f"{corpus.count / trial.seconds:7.1f} inst/s  stored {trial.stored}")
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    results = {t: summarize(corpus, trials, t) for t in targets}
    ratios = {}
    if "node" in results:
        for other in ("storescp", "orthanc"):
            if other in results:
                ratios[f"node/{other}"] = round(results["node"].instances_per_second
                                                / results[other].instances_per_second, 2)
    if args.json:
        print(json.dumps({
            "corpus": {"count": corpus.count, "bytes": corpus.total_bytes,
                       "source": corpus.source},
            "repeat": args.repeat, "tls": TLS is not None, "machine": machine(),
            "load_average_1min": {"before": round(load_before, 2),
                                  "after": round(os.getloadavg()[0], 2)},
            "results": {t: asdict(r) for t, r in results.items()}, "ratios": ratios,
            "wall_seconds": round(time.monotonic() - started, 1),
        }, indent=2))
    else:
        print()
        print_table(corpus, results, ratios)
        print(f"(benchmark took {time.monotonic() - started:.0f} s; 1-minute load average "
              f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after)")
    if PY_SPY_DIR is not None:
        for path in sorted(PY_SPY_DIR.glob("node-*.txt")):
            log(f"\npy-spy {path}: share of the association thread, inclusive")
            for share, frame in summarize_py_spy(path):
                log(f"  {share:5.1f} %  {frame}")
    return 0 if all(r.all_stored for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
