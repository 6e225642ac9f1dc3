"""Run one claimed job: infer → encode → write results → send to each destination.

Results are written to ``<data_dir>/results/<study>/<generation>/<hash of route, model, version>/``
before anything is sent, so a retry after a send failure resends the same files without running the
model again, and a retry after a crash rebuilds the same objects with the same UIDs (see
dicom_node.uids).
"""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.commitment.request import request_commitment
from dicom_node.config import Config, Destination
from dicom_node.encode.order import apply_order
from dicom_node.errors import (
    DestinationUnreachable,
    DicomNodeError,
    ModelError,
    PreprocessingError,
    SendError,
    UndecodableInstanceError,
    UnreadableInstanceError,
)
from dicom_node.jobs import queue
from dicom_node.jobs.queue import ClaimedJob
from dicom_node.log import get_logger
from dicom_node.messages import (
    FindingRecord,
    PipelineInput,
    PipelineOutput,
    findings_from_json,
    findings_to_json,
)
from dicom_node.retention import purged_at
from dicom_node.send import outages
from dicom_node.send.scu import send_files, where
from dicom_node.send.slots import send_slot
from dicom_node.store.db import Instance, Job, JobState
from dicom_node.store.index import set_aside_instances, study_instances
from dicom_node.store.readback import describe, read_instance, set_aside
from dicom_node.store.spool import write_file
from dicom_node.uids import validate_uid
from dicom_node.worklist.match import order_for_study
from dicom_node.worklist.order import Order

log = get_logger()

#: Written last in a job's results folder: the set of result files there is complete.
FINDINGS_FILE = "findings.json"


def results_folder(config: Config, job: ClaimedJob, model_version: str) -> Path:
    """Where a job's result objects live; names from UIDs and hashes, never from free text."""
    key = hashlib.sha256(f"{job.route_name}\x00{job.model_name}\x00{model_version}".encode())
    return (config.results_dir / job.study_instance_uid / str(job.generation)
            / key.hexdigest()[:16])


#: Longest job note kept (the instances its inputs left out, and why).
JOB_NOTE_LIMIT = 2000


def _load_sources(config: Config, sessions: sessionmaker[Session], job: ClaimedJob,
                  modalities: tuple[str, ...], headers_only: bool) -> list[Dataset]:
    """The job's input data sets. One that cannot be read (store.readback) is set aside and the
    job goes on with the others; its note names every set-aside instance it left out."""
    with sessions() as session:
        instances = study_instances(session, job.study_instance_uid)
        wanted = [i for i in instances if not modalities or i.modality in modalities]
    sources = []
    unreadable = []
    for inst in wanted:  # no transaction open while the files are read
        try:
            sources.append(read_instance(config.node.data_dir / inst.path,
                                         headers_only=headers_only))
        except UnreadableInstanceError as exc:
            unreadable.append((inst, str(exc)))
    with sessions.begin() as session:
        for inst, reason in unreadable:
            set_aside(session, inst, reason, stage=f"job {job.id}")
        skipped = set_aside_instances(session, job.study_instance_uid, modalities)
        if skipped:
            row = session.get(Job, job.id)
            if row is not None:
                row.note = ("left out " + f"{len(skipped)} unreadable instance(s): " + "; ".join(
                    f"{uid}: {why}" for uid, why in sorted(skipped.items())))[:JOB_NOTE_LIMIT]
    if skipped and not sources:
        raise PreprocessingError(
            f"every instance of the study this model reads is unreadable ({len(skipped)} set "
            "aside; see the job's note)")
    paths = [i.path for i in wanted]
    if not paths:
        with sessions() as session:
            deleted = purged_at(session, job.study_instance_uid)
        if deleted is not None:
            raise PreprocessingError(
                f"retention deleted the study's files on {deleted:%Y-%m-%d %H:%M}Z; send the "
                "study to the node again, then reprocess it")
        raise PreprocessingError(
            f"the study has no instance of modality {' or '.join(modalities)} for this model")
    return sources


def _set_aside_undecodable(sessions: sessionmaker[Session], job: ClaimedJob,
                           exc: UndecodableInstanceError, sources: list[Dataset]) -> bool:
    """Set aside the source instance whose pixel data the pipeline could not decode; False when
    it is not one of this job's sources (then the error fails the attempt as before)."""
    if exc.sop_instance_uid not in {str(ds.get("SOPInstanceUID", "")) for ds in sources}:
        return False
    with sessions.begin() as session:
        instance = session.get(Instance, exc.sop_instance_uid)
        if instance is None or instance.set_aside_reason is not None:
            return False
        set_aside(session, instance, describe(exc), stage=f"job {job.id}")
    return True


def _write_results(folder: Path, output: PipelineOutput, scratch: Path,
                   order: Order | None = None, study_uid: str = "") -> list[Path]:
    """Write the result objects (with the matched order's accession and request reference),
    then findings.json last: its presence marks a complete set."""
    paths = []
    for dataset in output.objects:
        if order is not None:
            apply_order(dataset, order, study_uid)
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        path = folder / f"{validate_uid(dataset.SOPInstanceUID, 'result SOP Instance UID')}.dcm"
        write_file(buffer.getvalue(), path, scratch)
        paths.append(path)
    write_file(findings_to_json(output.findings).encode(), folder / FINDINGS_FILE, scratch)
    return paths


def build_results(config: Config, sessions: sessionmaker[Session], job: ClaimedJob,
                  bound: Any = log) -> tuple[list[Path], str, tuple[FindingRecord, ...]]:
    """Run the model's pipeline and write its results (or reuse results already written);
    return the result files, the model version and the findings."""
    # Imported here: the receiver process imports the jobs package but never runs a model.
    from dicom_node.infer.card import load_card
    from dicom_node.pipelines import run_pipeline

    model_ref = config.model(job.model_name)
    card = load_card(model_ref.path)
    folder = results_folder(config, job, card.version)
    if (folder / FINDINGS_FILE).is_file():
        existing = sorted(folder.glob("*.dcm"))
        bound.info("results_reused", files=len(existing))
        return existing, card.version, findings_from_json(
            (folder / FINDINGS_FILE).read_text(encoding="utf-8"))
    with sessions() as session:
        prior = queue.sibling_findings(session, job)
        order = order_for_study(session, job.study_instance_uid)
    while True:
        sources = _load_sources(config, sessions, job, tuple(card.modalities),
                                headers_only=card.kind == "report")
        try:
            output = run_pipeline(card, model_ref.path, PipelineInput(
                study_instance_uid=job.study_instance_uid, generation=job.generation,
                route_name=job.route_name, sources=tuple(sources), prior_findings=prior,
                timestamp=job.created_at))
            break
        except UndecodableInstanceError as exc:
            # A corrupt compressed frame whose fragments parse (store.readback cannot see it
            # without decoding every frame twice): set that instance aside, run on the others.
            if not _set_aside_undecodable(sessions, job, exc, sources):
                raise
    if not output.objects:
        raise ModelError(f"model {card.name} {card.version} produced no result object")
    bound.info("inference_done", kind=card.kind, objects=len(output.objects), **output.summary)
    files = _write_results(folder, output, config.node.data_dir / "incoming", order,
                           job.study_instance_uid)
    return files, card.version, output.findings


class LeaseKeeper:
    """Renews a job's lease every third of its length while the job runs (a long inference must
    not lose the job to another worker); stops when the job ends or the lease is lost."""

    def __init__(self, config: Config, sessions: sessionmaker[Session], job: ClaimedJob) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(config, sessions, job), daemon=True, name=f"lease-{job.id}")

    def _run(self, config: Config, sessions: sessionmaker[Session], job: ClaimedJob) -> None:
        while not self._stop.wait(config.jobs.lease_seconds / 3):
            try:
                if not queue.renew(sessions, job, config.jobs):
                    return  # lost: the runner's own renew() before sending notices it
            except Exception:  # a busy database: try again at the next tick
                log.warning("lease_renewal_failed", job_id=job.id)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _deliver(config: Config, sessions: sessionmaker[Session], job: ClaimedJob,
             dest: Destination, files: list[Path], version: str, bound: Any) -> bool:
    """Send the results to one destination (holding one of its association slots) and record
    the delivery; for a destination with ``storage_commitment``, record the transaction and
    request it instead (dicom_node.commitment). DestinationUnreachable when the destination
    cannot be reached or stops answering (an outage); SendError when it refuses an object or
    anything else fails; False when the job is no longer ours."""
    with send_slot(sessions, dest.name, dest.max_associations, f"{job.owner}/job {job.id}"):
        try:
            report = send_files(dest, files, config.node.ae_title)
        except DestinationUnreachable:
            raise
        except SendError:  # it answered, and accepted none of the results' SOP classes
            _reached(sessions, dest.name, bound)
            raise
        if report.failed and report.interrupted is not None and not report.refused:
            raise DestinationUnreachable(
                f"{dest.name}: {where(dest)}: {report.interrupted} ({len(report.failed)} of "
                f"{len(files)} instance(s) unanswered)")
        _reached(sessions, dest.name, bound)  # it answered: any outage is over
        if report.failed:
            reasons = "; ".join(f"{uid}: {why}" for uid, why in report.failed[:3])
            raise SendError(f"{dest.name}: {len(report.failed)} of {len(files)} instance(s) "
                            f"failed: {reasons}")
        bound.info("results_sent", destination=dest.name, instances=report.sent,
                   warnings=report.warnings)
        if not dest.storage_commitment:
            queue.record_delivery(sessions, job, dest.name, version)
            return True
        requested = request_commitment(config, sessions, job, dest, files, version)
    if requested is None:
        return False
    bound.info("commitment_requested", destination=dest.name, transaction_uid=requested[0],
               instances=requested[1], timeout_minutes=dest.commitment_timeout_minutes)
    return True


def _reached(sessions: sessionmaker[Session], destination: str, bound: Any) -> None:
    """The destination answered: if that ends its outage, the jobs waiting for it go now."""
    if outages.note_reachable(sessions, destination):
        woken = queue.wake_awaiting(sessions, destination)
        if woken:
            bound.info("deliveries_resumed", destination=destination, jobs=len(woken))


def _await_delivery(config: Config, sessions: sessionmaker[Session], job: ClaimedJob,
                    unreachable: dict[str, tuple[str, datetime]], bound: Any) -> None:
    """The results are ready but destinations are down: wait the outage out (no attempt
    spent), or fail the job once its delivery window is over."""
    wait = queue.await_delivery(sessions, job, unreachable, config.jobs)
    if wait is None:
        bound.warning("job_lease_lost", reason="another worker took the job over")
    elif wait.state == JobState.FAILED:
        with sessions() as session:
            error = queue.last_error(session, job.id)
        bound.error("job_failed", reason=error, state=str(wait.state),
                    delivery_attempts=wait.delivery_attempts)
    else:
        bound.info("delivery_deferred", destinations=sorted(unreachable),
                   delivery_attempts=wait.delivery_attempts,
                   awaiting_since=wait.since.isoformat(timespec="seconds") + "Z",
                   next_try=wait.not_before.isoformat(timespec="seconds") + "Z")


def run_job(config: Config, sessions: sessionmaker[Session], job: ClaimedJob) -> None:
    """Run a claimed job to its end state; never raises for a job's own failure."""
    with LeaseKeeper(config, sessions, job):
        _run_job(config, sessions, job)


def _run_job(config: Config, sessions: sessionmaker[Session], job: ClaimedJob) -> None:
    bound = log.bind(job_id=job.id, study_uid=job.study_instance_uid, route=job.route_name,
                     model=job.model_name, attempt=job.attempts)
    bound.info("job_started", destinations=list(job.destinations))
    version = ""
    try:
        files, version, findings = build_results(config, sessions, job, bound)
        if not queue.renew(sessions, job, config.jobs):
            bound.warning("job_lease_lost", reason="another worker took the job over")
            return
        unreachable: dict[str, tuple[str, datetime]] = {}
        for name in job.destinations:
            if name in job.delivered:
                continue
            try:
                dest = config.destination(name)
            except KeyError:
                raise SendError(f"destination {name!r} is no longer in the config") from None
            outage = outages.take_try(sessions, name,
                                      dest.timeout_seconds + config.jobs.retry_base_seconds)
            if outage is not None:  # another worker tries it: wait, without connecting
                unreachable[name] = (outage.last_error, outage.since)
                continue
            try:
                delivered = _deliver(config, sessions, job, dest, files, version, bound)
            except DestinationUnreachable as exc:  # an outage: the other destinations go on
                unreachable[name] = (str(exc), outages.note_unreachable(
                    sessions, name, str(exc), config.jobs.retry_base_seconds))
                continue
            if not delivered:
                bound.warning("job_lease_lost", reason="another worker took the job over")
                return
        if unreachable:
            _await_delivery(config, sessions, job, unreachable, bound)
            return
    except PreprocessingError as exc:
        state = queue.fail(sessions, job, str(exc), config.jobs, permanent=True)
        bound.error("job_failed", reason=str(exc), state=str(state), retry="by administrator")
        return
    except (DicomNodeError, OSError, ValueError) as exc:
        state = queue.fail(sessions, job, f"{type(exc).__name__}: {exc}", config.jobs)
        event = "job_failed" if state is not None and state.value == "failed" else "job_retry"
        bound.error(event, reason=str(exc), state=str(state), attempts=job.attempts,
                    max_attempts=config.jobs.max_attempts)
        return
    except Exception as exc:  # a model or library bug must not kill the worker
        state = queue.fail(sessions, job, f"unexpected {type(exc).__name__}: {exc}", config.jobs)
        bound.exception("job_error", state=str(state))
        return
    state = queue.succeed(sessions, job, version, findings, config.jobs)
    if state == JobState.DONE:
        bound.info("job_done", model_version=version)
    elif state is not None:  # a destination's commitment failed while the job ran
        with sessions() as session:
            error = queue.last_error(session, job.id)
        event = "job_failed" if state == JobState.FAILED else "job_retry"
        bound.error(event, reason=error, state=str(state), attempts=job.attempts,
                    max_attempts=config.jobs.max_attempts)
