"""The ``dicom-node worklist`` command: query the RIS's Modality Worklist now, and list the
scheduled procedure steps the node keeps.

worklist           query now (the receiver's poll, once), store the items, list the stored steps
worklist --stored  list the stored steps only; no query (works without a [worklist] section)

The listing shows what an administrator needs to recognise an order (scheduled start, modality,
station, accession number, requested procedure, step) and never the patient's ID or name.
Exit status: 0; 1 when the worklist SCP cannot be queried (the message names AE@host:port and
why); 2 without an enabled ``[worklist]`` section (unless ``--stored``).

Registered into the main parser by :func:`register` (dicom_node.cli).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.output import (
    CONFIG_HELP,
    DEFAULT_CONFIG,
    cells,
    print_json,
    print_table,
    set_up_command,
)
from dicom_node.store.db import ScheduledStep, make_engine, make_sessionmaker
from dicom_node.worklist.order import step_order
from dicom_node.worklist.refresh import enabled_section, refresh

#: Columns of the listing (and keys of each ``--json`` step, which adds a few more).
COLUMNS = ("scheduled_start", "modality", "station_ae_title", "station_name", "accession_number",
           "requested_procedure", "sps_id", "sps_description")


def stored_steps(sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    """The stored scheduled steps, earliest scheduled first (unscheduled last); no patient data.
    """
    with sessions() as session:
        rows = list(session.scalars(select(ScheduledStep).order_by(
            ScheduledStep.scheduled_start.is_(None), ScheduledStep.scheduled_start,
            ScheduledStep.id)))
    steps = []
    for row in rows:
        order = step_order(row, "stored")
        code = order.requested_procedure_codes[0] if order.requested_procedure_codes else None
        procedure = " ".join(x for x in (code.value if code else "",
                                         order.requested_procedure_description
                                         or (code.meaning if code else "")) if x)
        steps.append({
            "scheduled_start": (f"{row.scheduled_start:%Y-%m-%d %H:%M}"
                                if row.scheduled_start else "-"),
            "modality": order.modality or "-",
            "station_ae_title": row.scheduled_station_ae_title or "-",
            "station_name": order.scheduled_station_name or "-",
            "accession_number": order.accession_number or "-",
            "requested_procedure": procedure or "-",
            "sps_id": order.scheduled_procedure_step_id or "-",
            "sps_description": order.scheduled_procedure_step_description or "-",
            "requested_procedure_id": order.requested_procedure_id,
            "study_instance_uid": order.study_instance_uid,
            "first_seen_at": row.first_seen_at.isoformat(timespec="seconds"),
            "last_seen_at": row.last_seen_at.isoformat(timespec="seconds"),
        })
    return steps


def cmd_worklist(args: argparse.Namespace) -> int:
    # stdout carries the listing; only warnings and errors of the query go to stderr.
    config = set_up_command(args.config, level="warning")
    section = None if args.stored else enabled_section(config)  # exit 2 before any work
    sessions = make_sessionmaker(make_engine(config.database.url))
    counts = refresh(config, sessions) if section is not None else None
    steps = stored_steps(sessions)
    if args.json:
        refreshed = None if section is None or counts is None else {
            "ae_title": section.ae_title, "host": section.host, "port": section.port,
            **asdict(counts)}
        print_json({"refreshed": refreshed, "steps": steps})
        return 0
    if section is not None and counts is not None:
        print(f"Modality Worklist {section.ae_title}@{section.host}:{section.port}: fetched "
              f"{counts.fetched} (new {counts.new}, updated {counts.updated}, pruned "
              f"{counts.pruned})")
    if steps:
        print_table(cells(steps, COLUMNS), COLUMNS, trim=True)
    print(f"{len(steps)} scheduled step(s) stored")
    return 0


def register(sub: Any) -> None:
    """Add ``worklist`` to the main parser's subcommands."""
    p = sub.add_parser("worklist", help="query the Modality Worklist now; list stored steps")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--stored", action="store_true",
                   help="list the stored steps only, without querying the worklist")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_worklist)
