"""The ``dicom-node`` command.

serve         run the node: receiver + workers, restarted if they die
receive       run only the receiver process (SCP, completion sweep)
worker        run only a worker process (inference, encoding, sending)
check-config  validate config.toml and the model cards it names
echo          C-ECHO a configured destination
send          C-STORE files or folders to a configured destination
studies       list studies and their state
jobs          list jobs; ``jobs retry [ID...]`` re-queues failed jobs
route         ``route --dry-run STUDY_UID|FOLDER``: which routes fire and why
reprocess     route processed studies again (a new generation), or an incomplete one now
purge         delete the files of processed studies now ([retention]; --dry-run lists them)
db            the database schema: status (current vs this build's revision), upgrade
worklist      query the RIS's Modality Worklist now and list the stored scheduled steps
mpps          list the performed procedure steps modalities reported (MPPS)
commitments   list Storage Commitment requests to destinations: pending, failed, timed out
models        list, show or validate model cards (``models validate`` exits 2 on a mistake)
doctor        check versions, devices, database, data folder, disk space and models
evaluate      reproduce a model card's metrics on labelled data (``evaluate MODEL DATA``)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import Config, load_config
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.output import CONFIG_HELP, DEFAULT_CONFIG, print_rows, set_up_command


def validate_models(config: Config) -> list[str]:
    """Load every model card the config names; return the problems found (empty: all valid)."""
    from dicom_node.infer.card import load_card

    problems = []
    for model in config.models:
        try:
            card = load_card(model.path)
        except ConfigError as exc:
            problems.append(f"models[{model.name}]: {exc}")
            continue
        if card.name != model.name:
            problems.append(f"models[{model.name}]: the card at {model.path} is named "
                            f"{card.name!r}, not {model.name!r}")
    return problems


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    problems = validate_models(config)
    if problems:
        raise ConfigError("\n".join(problems))
    print(f"{args.file}: valid ({len(config.routes)} routes, {len(config.models)} models, "
          f"{len(config.destinations)} destinations)")
    return 0


def refuse_half_installed(config: Config) -> None:
    """Stop ``serve`` and ``worker`` at start, with ``doctor``'s message, when the config names
    models but Keras or its backend is not installed (every job would fail its attempts)."""
    from dicom_node.doctor import backend_problem
    from dicom_node.log import get_logger

    problem = backend_problem() if config.models else None
    if problem is not None:
        get_logger().error("start_refused", reason=problem, models=len(config.models))
        raise DicomNodeError(f"cannot run the {len(config.models)} configured model(s): "
                             f"{problem}")


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.processes import serve

    config = set_up_command(args.config, process="supervisor")
    problems = validate_models(config)
    if problems:
        raise ConfigError("\n".join(problems))
    refuse_half_installed(config)
    return serve(config, Path(args.config).absolute())


def cmd_receive(args: argparse.Namespace) -> int:
    from dicom_node.processes import run_receiver

    run_receiver(set_up_command(args.config, process="receiver"))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.processes import run_worker

    config = set_up_command(args.config, process=args.name or "worker")
    refuse_half_installed(config)
    run_worker(config, args.name)
    return 0


def _destination(config: Config, name: str) -> Any:
    try:
        return config.destination(name)
    except KeyError:
        known = ", ".join(d.name for d in config.destinations) or "none"
        raise ConfigError(f"unknown destination {name!r} (configured: {known})") from None


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.send.scu import echo, where

    config = set_up_command(args.config)
    dest = _destination(config, args.destination)
    status = echo(dest, config.node.ae_title)
    print(f"{dest.name} ({where(dest)}): C-ECHO status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from dicom_node.send.scu import expand_paths, send_files

    config = set_up_command(args.config)
    dest = _destination(config, args.to)
    files = expand_paths(Path(p) for p in args.paths)
    report = send_files(dest, files, config.node.ae_title)
    print(f"{dest.name}: {report.sent} sent ({report.warnings} with warnings), "
          f"{len(report.failed)} failed")
    for uid, reason in report.failed:
        print(f"  failed {uid}: {reason}", file=sys.stderr)
    return 0 if not report.failed else 1


def _sessions(config: Config) -> Any:
    from dicom_node.store.db import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(config.database.url))


def cmd_studies(args: argparse.Namespace) -> int:
    from dicom_node.store.index import list_studies

    config = set_up_command(args.config)
    with _sessions(config)() as session:
        rows = list_studies(session, args.limit)
    for row in rows:
        row["jobs"] = " ".join(f"{k}={v}" for k, v in sorted(row["jobs"].items())) or "-"
    print_rows(rows, ["study_instance_uid", "state", "generation", "instances", "set_aside",
                      "last_received_at", "jobs", "order", "note"], args.json)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicom_node.jobs import queue

    config = set_up_command(args.config)
    sessions = _sessions(config)
    if args.action == "retry":
        retried = queue.retry(sessions, args.ids or None)
        print(f"re-queued {len(retried)} failed job(s): {', '.join(map(str, retried)) or '-'}")
        return 0
    with sessions() as session:
        rows = queue.list_jobs(session, args.state, args.limit)
    print_rows(rows, ["id", "study_instance_uid", "generation", "route", "model",
                      "model_version", "state", "attempts", "delivered", "awaiting_delivery",
                      "order", "last_error", "note"], args.json)
    return 0


def cmd_commitments(args: argparse.Namespace) -> int:
    from dicom_node.commitment.store import list_commitments

    config = set_up_command(args.config)
    states = ([args.state] if args.state else [] if args.all
              else ["requested", "failed", "timed_out"])
    with _sessions(config)() as session:
        rows = list_commitments(session, states, args.limit)
    print_rows(rows, ["id", "job_id", "study_instance_uid", "destination", "delivery", "state",
                      "instances", "requested_at", "deadline", "reported_at", "note"],
               args.json)
    return 0


def cmd_mpps(args: argparse.Namespace) -> int:
    from dicom_node.mpps.store import list_performed_steps

    config = set_up_command(args.config)
    with _sessions(config)() as session:
        rows = list_performed_steps(session, args.limit)
    for row in rows:
        row["study_uids"] = ",".join(row["study_uids"])
        for key in ("created_at", "updated_at"):
            row[key] = row[key].isoformat(timespec="seconds")
    print_rows(rows, ["sop_instance_uid", "status", "modality", "station_ae_title",
                      "study_uids", "series", "instances", "updated_at",
                      "discontinuation_reason"], args.json)
    return 0


def cmd_reprocess(args: argparse.Namespace) -> int:
    from dicom_node.complete import force
    from dicom_node.store.index import reprocess

    config = set_up_command(args.config)
    sessions = _sessions(config)
    forced = [uid for uid in args.studies if force(config, sessions, uid)]
    done, purged = reprocess(sessions, [uid for uid in args.studies if uid not in forced])
    for uid in args.studies:
        outcome = ("was incomplete; routed now with what arrived" if uid in forced
                   else "reopened; routed again at the next completion sweep" if uid in done
                   else f"its files were deleted by retention on {purged[uid]:%Y-%m-%d %H:%M}Z: "
                        "send the study to the node again, then reprocess it" if uid in purged
                   else "not processed yet, or unknown: left alone")
        print(f"{uid}: {outcome}")
    return 0 if len(done) + len(forced) == len(args.studies) else 1


def cmd_purge(args: argparse.Namespace) -> int:
    from dicom_node.retention import GRACE_SECONDS, Retention

    config = set_up_command(args.config)
    section = config.retention
    if section is None or not section.enabled:
        print("retention is off: no [retention] section (or enabled = false) in the config; "
              "nothing is deleted")
        return 0
    if not args.dry_run:
        print(f"deleting; files are moved back if they were being stored meanwhile, so this "
              f"takes {GRACE_SECONDS:.0f} s more", file=sys.stderr)
    # a pass the receiver is running over the same data folder finishes first
    report = Retention(_sessions(config)).run(config, dry_run=args.dry_run, wait=True)
    rows = [{"study_instance_uid": c.study_instance_uid, "state": str(c.state),
             "last_activity": c.last_activity.isoformat(timespec="seconds") + "Z",
             "files": c.files, "mb": round(c.bytes / 1e6, 1), "reason": c.reason}
            for c in report.purged]
    print_rows(rows, ["study_instance_uid", "state", "last_activity", "files", "mb", "reason"],
               args.json)
    if not args.json:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {len(report.purged)} study(ies), {report.files} file(s), "
              f"{report.bytes / 1e6:.1f} MB; free: {report.free_bytes_after / 1e9:.1f} GB"
              + (f"; {report.restored} file(s) stored meanwhile were kept"
                 if report.restored else ""))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from dicom_node.route import route_study, summarize_files
    from dicom_node.send.scu import expand_paths
    from dicom_node.worklist.match import find_step
    from dicom_node.worklist.order import Order, step_order

    config = set_up_command(args.config)
    target = Path(args.study)
    sessions = _sessions(config)
    if target.exists():
        def left_out(path: str, exc: Exception) -> None:
            print(f"left out {path}: {exc}")

        summary = summarize_files(expand_paths([target]), args.calling_ae or (), left_out)
        if summary.instance_count == 0:
            raise DicomNodeError(f"{target}: no DICOM file that can be read")
    else:
        from dicom_node.complete import summarize_stored_study

        with sessions() as session:
            summary = summarize_stored_study(session, config.node.data_dir, args.study)
        if summary.instance_count == 0:
            raise DicomNodeError(f"{args.study}: neither a folder nor a stored study UID")
    print(f"study {summary.study_instance_uid}: {summary.instance_count} instance(s), "
          f"{summary.series_count} series, modalities "
          f"{', '.join(sorted(summary.values.get('Modality', ()))) or '-'}")
    order: Order | None = None
    if config.worklist is not None and config.worklist.enabled:
        with sessions() as session:  # the same rules as completion; nothing is recorded
            found = find_step(session, summary, config.worklist.match_days)
        if found is not None:
            order = step_order(*found)
        print("worklist order: " + (f"matched by {order.method}, accession "
                                    f"{order.accession_number or '-'}" if order else "none"))
    fired = 0
    for decision in route_study(summary, config.routes, order):
        fired += decision.fires
        verdict = "FIRES" if decision.fires else "does not fire"
        print(f"route {decision.route.name!r}: {verdict}"
              + (f" → models {list(decision.route.models)} → {list(decision.route.send_to)}"
                 if decision.fires else ""))
        for reason in decision.reasons:
            print(f"    {reason}")
    if not fired:
        print("no route fires: the study would be kept and logged as unrouted")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
        return p

    with_config(sub.add_parser("serve", help="run receiver and workers")).set_defaults(
        func=cmd_serve)
    with_config(sub.add_parser("receive", help="run the receiver process only")).set_defaults(
        func=cmd_receive)
    p = with_config(sub.add_parser("worker", help="run one worker process only"))
    p.add_argument("--name", help="worker name recorded on the jobs it claims")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("check-config", help="validate a config file and its model cards")
    p.add_argument("file", nargs="?", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_check_config)
    p = with_config(sub.add_parser("echo", help="C-ECHO a configured destination"))
    p.add_argument("destination")
    p.set_defaults(func=cmd_echo)
    p = with_config(sub.add_parser("send", help="C-STORE files or folders to a destination"))
    p.add_argument("--to", required=True, help="destination name from the config")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_send)
    p = with_config(sub.add_parser("studies", help="list studies and their state"))
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_studies)
    p = with_config(sub.add_parser("jobs", help="list jobs, or retry failed ones"))
    p.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
    p.add_argument("ids", nargs="*", type=int, help="job ids for retry (default: all failed)")
    p.add_argument("--state", choices=["pending", "running", "done", "failed"])
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)
    p = with_config(sub.add_parser(
        "commitments", help="list Storage Commitment requests: pending, failed, timed out"))
    p.add_argument("--state", choices=["requested", "committed", "failed", "timed_out"])
    p.add_argument("--all", action="store_true", help="include committed ones")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_commitments)
    p = with_config(sub.add_parser(
        "mpps", help="list the performed procedure steps modalities reported (MPPS)"))
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mpps)
    p = with_config(sub.add_parser(
        "reprocess", help="route processed studies again (new generation, new results)"))
    p.add_argument("studies", nargs="+", metavar="STUDY_UID")
    p.set_defaults(func=cmd_reprocess)
    p = with_config(sub.add_parser(
        "purge", help="delete the files of processed studies now, as [retention] says"))
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_purge)
    p = with_config(sub.add_parser("route", help="show which routes fire for a study"))
    p.add_argument("--dry-run", action="store_true", required=True,
                   help="only evaluate; nothing is queued")
    p.add_argument("study", help="a stored Study Instance UID or a folder/file of DICOM")
    p.add_argument("--calling-ae", action="append", help="calling AE title to assume (folder)")
    p.set_defaults(func=cmd_route)
    from dicom_node import db_cli, models_cli, worklist_cli

    models_cli.register(sub)
    worklist_cli.register(sub)
    db_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except DicomNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except InvalidDicomError as exc:
        print(f"error: not a DICOM file: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        print(f"error: database: {type(exc).__name__}: {exc.args[0] if exc.args else ''}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
