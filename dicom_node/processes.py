"""The node's OS processes: receiver, worker, and the supervisor that ``serve`` runs.

``dicom-node serve`` starts one receiver process (the SCP, the completion sweep, the config watch)
and ``jobs.workers`` worker processes (inference, encoding, sending). They share only the database
and the data folder, so a slow or crashing model never stalls the SCP. The supervisor restarts a
child that dies, with a growing delay, and forwards SIGHUP (reload) and SIGTERM (stop).

A worker names itself in the leases it holds by host, pid and process start time
(dicom_node.jobs.owners). Every worker (``serve``'s, or ``dicom-node worker``), when it starts,
gives back the job leases and send slots of owners on this machine that are provably dead (a
``serve`` killed with -9, a worker that crashed), so that interrupted jobs run again within seconds
instead of after ``jobs.lease_seconds``; owners on other machines, and live ones here, keep
theirs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config, JobsSection
from dicom_node.jobs import owners, queue
from dicom_node.log import get_logger
from dicom_node.reload import ConfigWatcher
from dicom_node.send import slots
from dicom_node.store.db import make_engine, make_sessionmaker

log = get_logger()

#: A child that ran this long before it died is restarted after the shortest delay again.
STABLE_SECONDS = 300.0
#: Longest delay before a child that keeps dying is started again.
MAX_RESTART_DELAY = 60.0

#: Thread-pool sizes of the numeric libraries, set to 1 for worker processes.
WORKER_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def release_dead_owners(sessions: sessionmaker[Session], jobs: JobsSection) -> int:
    """Give back the job leases and send slots of owners on this machine that are provably dead
    (one ``lease_released`` / ``send_slot_released`` event each); how many leases. A database
    error is logged, not raised: the leases then expire as they would have."""
    reason = "owner process is dead"
    try:
        released = queue.release_dead(sessions, owners.is_dead, jobs)
        freed = slots.release_dead(sessions, owners.is_dead)
    except Exception:
        log.exception("lease_release_failed")
        return 0
    for job in released:
        log.info("lease_released", job_id=job.id, study_uid=job.study_instance_uid,
                 owner=job.owner, state=str(job.state), attempts=job.attempts, reason=reason,
                 **({"commitment_requested_again": list(job.recommitted)}
                    if job.recommitted else {}))
    for destination, slot, holder in freed:
        log.info("send_slot_released", destination=destination, slot=slot, holder=holder,
                 reason=reason)
    return len(released)


def run_receiver(config: Config) -> None:
    """The receiver process: blocks until SIGTERM/SIGINT. With an ``[http]`` section it also
    serves ``/metrics``, ``/healthz`` and ``/readyz`` (dicom_node.monitor)."""
    from dicom_node.monitor.server import MonitorServer, warn_if_restart_needed
    from dicom_node.receive.scp import Receiver
    from dicom_node.scheduler import ReceiverScheduler

    engine = make_engine(config.database.url)
    sessions = make_sessionmaker(engine)
    receiver = Receiver(config, engine)
    scheduler: ReceiverScheduler | None = None

    def apply(new: Config) -> None:
        receiver.reconfigure(new)
        if scheduler is not None:
            scheduler.reconfigure(new)
        warn_if_restart_needed(config.http, new.http)

    watcher = ConfigWatcher(config, apply) if config.source else None
    scheduler = ReceiverScheduler(config, sessions, watcher.check if watcher else None)
    monitor = (MonitorServer(config.http, receiver, scheduler.worklist)
               if config.http is not None else None)
    stop = _stop_event()
    if watcher:
        watcher.install_sighup()
    receiver.start()
    scheduler.start()
    if monitor is not None:
        monitor.start()
    try:
        stop.wait()
    finally:
        if monitor is not None:
            monitor.stop()
        receiver.stop()
        scheduler.stop()


def run_worker(config: Config, name: str | None = None) -> None:
    """A worker process: claims jobs and runs them until SIGTERM/SIGINT (after the current job)."""
    from dicom_node.jobs.runner import run_job

    owner = owners.this_process(name or "worker")
    sessions = make_sessionmaker(make_engine(config.database.url))
    release_dead_owners(sessions, config.jobs)
    holder = {"config": config}
    watcher = (ConfigWatcher(config, lambda new: holder.update(config=new))
               if config.source else None)
    stop = _stop_event()
    if watcher:
        watcher.install_sighup()
    log.info("worker_started", worker=owner)
    last_check = time.monotonic()
    while not stop.is_set():
        if watcher and time.monotonic() - last_check > 2.0:
            watcher.check()
            last_check = time.monotonic()
        current = holder["config"]
        try:
            job = queue.claim(sessions, owner, current.jobs)
        except Exception:
            log.exception("claim_failed")
            job = None
        if job is None:
            stop.wait(current.jobs.poll_seconds)
            continue
        run_job(current, sessions, job)
    log.info("worker_stopped", worker=owner)


class RestartPolicy:
    """When to start a child again that died: 2, 4, 8 … s up to :data:`MAX_RESTART_DELAY`.

    A child that had been running for :data:`STABLE_SECONDS` before it died starts the count
    afresh, so one crash after days of service is retried after 2 s, not after the delay that
    crashes long ago had reached. A child that dies at start is retried for ever, at most once a
    minute: the receiver must come back as soon as the cause (a full disk, a busy port) is gone.
    """

    def __init__(self) -> None:
        self.failures = 0

    def delay(self, ran_seconds: float) -> float:
        """Seconds to wait before the next start of a child that ran ``ran_seconds``."""
        if ran_seconds >= STABLE_SECONDS:
            self.failures = 0
        self.failures += 1
        return min(2.0 ** self.failures, MAX_RESTART_DELAY)


def serve(config: Config, config_path: Path) -> int:
    """Supervise one receiver and ``jobs.workers`` workers; returns when stopped."""
    stop = _stop_event()
    children: dict[str, subprocess.Popen[bytes]] = {}
    started_at: dict[str, float] = {}
    policies: dict[str, RestartPolicy] = {}
    names = ["receiver"] + [f"worker-{i + 1}" for i in range(config.jobs.workers)]
    # The schema is brought to head once, before any child starts: a database the node cannot
    # use (upgraded by a newer dicom-node, unreachable) stops here with its message, instead of
    # children that fail at start and are restarted for ever.
    # Each worker gives back the leases of this machine's dead workers when it starts
    # (run_worker), those of a serve that was killed with -9 included.
    make_engine(config.database.url).dispose()

    def start(name: str) -> None:
        role = "receive" if name == "receiver" else "worker"
        argv = [sys.executable, "-m", "dicom_node", role, "--config", str(config_path)]
        if role == "worker":
            argv += ["--name", f"{socket.gethostname()}:{name}"]
        env = dict(os.environ)
        if role == "worker":
            # One BLAS thread per worker: numpy's preprocessing otherwise spawns a thread per core
            # in every worker, and they fight the model (and each other) for the cores. Measured
            # 2–4× less CPU per image (docs/performance.md). An explicit setting wins.
            for variable in WORKER_THREAD_ENV:
                env.setdefault(variable, "1")
        children[name] = subprocess.Popen(argv, env=env)
        started_at[name] = time.monotonic()
        log.info("process_started", process=name, pid=children[name].pid)

    def forward_hup(_signum: int, _frame: FrameType | None) -> None:
        for child in children.values():
            child.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGHUP, forward_hup)
    for name in names:
        start(name)
    next_start: dict[str, float] = {}
    while not stop.wait(0.5):
        for name in names:
            child = children[name]
            if child.poll() is None:
                continue
            if name not in next_start:
                policy = policies.setdefault(name, RestartPolicy())
                ran = time.monotonic() - started_at[name]
                delay = policy.delay(ran)
                next_start[name] = time.monotonic() + delay
                log.error("process_died", process=name, exit_code=child.returncode,
                          ran_seconds=round(ran, 1), failures_in_a_row=policy.failures,
                          restart_in_seconds=delay)
            elif time.monotonic() >= next_start[name]:
                del next_start[name]
                start(name)
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    for child in children.values():
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
    log.info("stopped")
    return 0
