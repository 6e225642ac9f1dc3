"""The ``db`` command of ``dicom-node``: the schema revision of the index.

db status    the database's schema revision and this build's (head); exit 1 when behind
db upgrade   bring the schema to head now (every process also does it when it starts)

Registered into the main parser by :func:`register` (dicom_node.cli).
"""

from __future__ import annotations

import argparse
from typing import Any

from dicom_node.output import CONFIG_HELP, DEFAULT_CONFIG, set_up_command


def _url(args: argparse.Namespace) -> str:
    return set_up_command(args.config).database.url


def cmd_db_status(args: argparse.Namespace) -> int:
    from dicom_node.store import migrations
    from dicom_node.store.db import make_engine

    engine = make_engine(_url(args), upgrade=False)
    try:
        with engine.connect() as connection:
            current = migrations.current_revision(connection)
            migrations.check_known(connection, current)  # newer than this build: ConfigError
    finally:
        engine.dispose()
    head = migrations.head_revision()
    print(f"database: {engine.url.render_as_string(hide_password=True)}")
    print(f"current revision: {current or 'none'}")
    print(f"head revision:    {head}")
    if current == head:
        print("up to date")
        return 0
    print("behind: the node upgrades it when it starts, or run `dicom-node db upgrade`"
          + (" (no alembic_version: a new database, or one made before migrations)"
             if current is None else ""))
    return 1


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from dicom_node.store import migrations
    from dicom_node.store.db import make_engine

    engine = make_engine(_url(args))
    try:
        with engine.connect() as connection:
            current = migrations.current_revision(connection)
    finally:
        engine.dispose()
    print(f"database at head revision {current}")
    return 0


def register(sub: Any) -> None:
    """Add ``db`` to the main parser's subcommands."""
    p = sub.add_parser("db", help="the database's schema revision: status, upgrade")
    p.add_argument("action", choices=["status", "upgrade"])
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.set_defaults(func=lambda args: (cmd_db_status if args.action == "status"
                                      else cmd_db_upgrade)(args))
