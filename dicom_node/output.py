"""What every ``dicom-node`` command shares: its config and logging set-up, and its stdout.

A command loads its config and configures logging once, with :func:`set_up_command`; what it
prints is an aligned table (:func:`print_table`, :func:`print_rows` for the listings) or, with
``--json``, JSON (:func:`print_json`). One place, so that the listings look alike and a console
or REST API that comes later can reuse the same rows. stdout carries only the command's output;
events go to stderr through structlog.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dicom_node.config import Config, load_config
from dicom_node.log import configure_logging

#: The config file a command reads when --config is not given.
DEFAULT_CONFIG = os.environ.get("DICOM_NODE_CONFIG", "config.toml")
CONFIG_HELP = "config file (default: $DICOM_NODE_CONFIG or ./config.toml)"


def set_up_command(path: str | Path, *, process: str | None = None,
                   level: str | None = None) -> Config:
    """Load the config at *path* and configure logging from its ``[logging]`` section.

    *level* overrides the section's level: ``"warning"`` for commands whose stdout is their
    output. (A command that runs without a config, ``models`` or ``doctor``, calls
    :func:`dicom_node.log.configure_logging` with ``"auto"`` and the level it wants.)
    """
    config = load_config(path)
    configure_logging(config.logging.format, level or config.logging.level, process=process)
    return config


def print_json(value: Any, *, ensure_ascii: bool = True) -> None:
    """*value* as indented JSON on stdout (what ``--json`` prints)."""
    print(json.dumps(value, indent=2, ensure_ascii=ensure_ascii))


def cells(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> list[list[str]]:
    """The *columns* of each row, as text."""
    return [[str(row[c]) for c in columns] for row in rows]


def table_lines(rows: Sequence[Sequence[str]], columns: Sequence[str], *,
                trim: bool = False) -> list[str]:
    """A header of upper-cased column names and one line per row, each column as wide as its
    widest cell, two spaces apart; *trim* drops the trailing spaces of each line."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return [line.rstrip() for line in lines] if trim else lines


def print_table(rows: Sequence[Sequence[str]], columns: Sequence[str], *,
                trim: bool = False) -> None:
    """The aligned table of :func:`table_lines` on stdout."""
    for line in table_lines(rows, columns, trim=trim):
        print(line)


def print_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """A listing (``studies``, ``jobs``, ``commitments`` ...): every row as JSON, or the
    *columns* as a table, ``(none)`` when there is no row."""
    if as_json:
        print_json(rows)
    elif not rows:
        print("(none)")
    else:
        print_table(cells(rows, columns), columns)
