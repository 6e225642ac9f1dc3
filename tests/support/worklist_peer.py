"""DCMTK's wlmscpfs as the RIS's Modality Worklist SCP, on loopback, for tests.

:class:`WorklistSCP` runs ``wlmscpfs -dfp DIR PORT`` (single process) over a folder
``DIR/<AE title>/`` holding a ``lockfile`` and one ``.wl`` file per worklist item, made from
dump text with ``dump2dcm +te`` (see PEERS.md). Items can be added and removed while it runs
(wlmscpfs reads the folder at every query); ``stop()`` then ``start()`` brings it back on the same
port, which is how a test makes a RIS outage. :func:`worklist_item_dump` writes the dump text of
one complete item (wlmscpfs skips items that lack a return key of type 1, Patient's Name among
them, so the dump has a made-up one).

Facts about wlmscpfs 3.6.7 that the tests rely on:

- the matching keys of the step (Modality, Scheduled Station AE Title, the Start Date range
  ``YYYYMMDD-YYYYMMDD``) must be inside the Scheduled Procedure Step Sequence item; a Modality at
  the top level of the identifier is ignored and answered with pending status 0xFF01;
- Scheduled Station Name is returned but never matched on: every item comes back whatever the
  query says;
- an empty sequence in the identifier is expanded to every attribute the SCP supports;
- a called AE title without a folder is rejected (permanent, "called AE title not recognised");
- without the ``lockfile`` every query fails with status 0xA700 (out of resources);
- ``--sleep-before S`` delays each answer by S seconds (a slow RIS).

The fixture ``worklist_scp`` (a started SCP, AE title WLSCP) is registered with pytest through
``pytest_plugins`` in tests/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any, Self

import pytest

from tests.support.peers import (
    PEER_ENV,
    START_TIMEOUT_S,
    _fresh_dir,
    _Managed,
    _spawn,
    _terminate,
    dcmtk,
    free_port,
    is_listening,
    require_program,
    wait_until,
)


def _line(tag: str, vr: str, value: str | None) -> str:
    return f"({tag}) {vr} [{value}]" if value else f"({tag}) {vr}"


def _code_item(value: str, scheme: str, meaning: str) -> list[str]:
    return ["(fffe,e000) -", _line("0008,0100", "SH", value), _line("0008,0102", "SH", scheme),
            _line("0008,0104", "LO", meaning), "(fffe,e00d) -"]


def worklist_item_dump(
    *,
    accession: str = "ACC0001",
    study_uid: str = "1.2.826.0.1.3680043.8.498.7001",
    patient_id: str = "PID0001",
    patient_name: str = "TEST^WORKLIST",
    modality: str = "CT",
    station_ae: str = "CT01",
    station_name: str = "CTROOM1",
    day: date | str | None = None,
    time: str = "090000",
    requested_procedure_id: str = "RP0001",
    procedure_code: str = "CTCHEST",
    procedure_meaning: str = "CT of the chest",
    procedure_description: str = "CT CHEST",
    sps_id: str = "SPS0001",
    sps_description: str = "Chest CT",
    protocol_code: str = "PROT1",
    protocol_meaning: str = "Chest protocol",
    placer_order: str = "PLACER0001",
    filler_order: str = "FILLER0001",
) -> str:
    """dump2dcm text of one worklist item with one scheduled procedure step (``day``: the step's
    start date, a date or YYYYMMDD; default today)."""
    when = day if isinstance(day, str) else f"{day or date.today():%Y%m%d}"
    lines = [
        _line("0008,0005", "CS", "ISO_IR 100"),
        _line("0008,0050", "SH", accession),
        _line("0010,0010", "PN", patient_name),
        _line("0010,0020", "LO", patient_id),
        _line("0020,000d", "UI", study_uid),
        _line("0032,1060", "LO", procedure_description),
        "(0032,1064) SQ",
        *_code_item(procedure_code, "L", procedure_meaning),
        "(fffe,e0dd) -",
        "(0040,0100) SQ",
        "(fffe,e000) -",
        _line("0008,0060", "CS", modality),
        _line("0040,0001", "AE", station_ae),
        _line("0040,0002", "DA", when),
        _line("0040,0003", "TM", time),
        _line("0040,0007", "LO", sps_description),
        "(0040,0008) SQ",
        *_code_item(protocol_code, "L", protocol_meaning),
        "(fffe,e0dd) -",
        _line("0040,0009", "SH", sps_id),
        _line("0040,0010", "SH", station_name),
        "(fffe,e00d) -",
        "(fffe,e0dd) -",
        _line("0040,1001", "SH", requested_procedure_id),
        _line("0040,2016", "LO", placer_order),
        _line("0040,2017", "LO", filler_order),
    ]
    return "\n".join(lines) + "\n"


def write_worklist_file(folder: Path, name: str, dump: str, scratch_dir: Path) -> Path:
    """``folder/<name>.wl`` from dump text (``dump2dcm +te``), made in ``scratch_dir`` and renamed
    into place, so that an SCP reading ``folder`` sees it whole (wlmscpfs, or Orthanc's Modality
    Worklists plugin)."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"item name {name!r}: letters, digits, - and _ only")
    scratch_dir.mkdir(parents=True, exist_ok=True)
    dump_path = scratch_dir / f"{name}.dump"
    dump_path.write_text(dump, encoding="latin-1")
    scratch = scratch_dir / f"{name}.wl"
    dcmtk("dump2dcm", "+te", dump_path, scratch, check=True)
    target = folder / f"{name}.wl"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(scratch, target)
    return target


class WorklistSCP(_Managed):
    """wlmscpfs on a free port, serving the items in ``db_dir/<ae_title>/``.

    ``extra_args`` go to wlmscpfs (e.g. ``("--sleep-before", "3")``). One association at a time
    (``--single-process``): no forked child outlives ``stop()`` holding the port.
    """

    def __init__(self, workdir: Path, *, ae_title: str = "WLSCP", port: int | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir).resolve()
        self.ae_title = ae_title
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.db_dir = self.workdir / "worklists"
        self.items_dir = self.db_dir / ae_title
        self.dumps_dir = self.workdir / "dumps"
        self.log_path = self.workdir / "wlmscpfs.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Start (or start again, on the same port and with the same items)."""
        self.items_dir.mkdir(parents=True, exist_ok=True)
        self.dumps_dir.mkdir(parents=True, exist_ok=True)
        self.set_lockfile(True)
        self.process = _spawn(
            [require_program("wlmscpfs"), "--single-process", *self.extra_args,
             "-dfp", str(self.db_dir), str(self.port)], self.log_path, env=PEER_ENV)
        process = self.process
        wait_until(lambda: is_listening(self.port) or process.poll() is not None,
                   START_TIMEOUT_S, f"wlmscpfs to listen on {self.port}")
        if process.poll() is not None:
            raise RuntimeError(f"wlmscpfs exited with {process.returncode}: {self.log_text()}")
        return self

    def stop(self) -> int | None:
        """SIGTERM and wait; the port stops listening (a RIS outage)."""
        if self.process is None:
            return None
        code = _terminate(self.process)
        wait_until(lambda: not is_listening(self.port), START_TIMEOUT_S,
                   f"wlmscpfs to stop listening on {self.port}")
        return code

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # items ----------------------------------------------------------------------------------

    def add_item(self, name: str, dump: str) -> Path:
        """Write item ``name`` from dump text (``dump2dcm +te``); it is served from the next
        query on. The file appears whole (written aside, then renamed)."""
        return write_worklist_file(self.items_dir, name, dump, self.dumps_dir)

    def add(self, name: str, **fields: Any) -> Path:
        """``add_item(name, worklist_item_dump(**fields))``."""
        return self.add_item(name, worklist_item_dump(**fields))

    def remove_item(self, name: str) -> None:
        (self.items_dir / f"{name}.wl").unlink()

    def item_names(self) -> list[str]:
        return sorted(p.stem for p in self.items_dir.glob("*.wl"))

    def set_lockfile(self, present: bool) -> None:
        """With ``present=False`` every query fails with status 0xA700."""
        lockfile = self.items_dir / "lockfile"
        if present:
            lockfile.touch()
        else:
            lockfile.unlink(missing_ok=True)

    # config ---------------------------------------------------------------------------------

    def section(self, **overrides: Any) -> dict[str, Any]:
        """A ``[worklist]`` table for this SCP (short timeout and poll), with overrides."""
        table: dict[str, Any] = {"ae_title": self.ae_title, "host": "127.0.0.1",
                                 "port": self.port, "timeout_seconds": 5.0,
                                 "poll_seconds": 60.0}
        table.update(overrides)
        return table

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def worklist_scp(tmp_path: Path) -> Iterator[WorklistSCP]:
    """A started wlmscpfs (AE title WLSCP) with no items; add them with ``add``/``add_item``."""
    scp = WorklistSCP(_fresh_dir(tmp_path, "wlmscpfs"))
    try:
        yield scp.start()
    finally:
        if scp.running:
            scp.stop()
