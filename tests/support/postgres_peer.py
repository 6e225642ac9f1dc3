"""A real PostgreSQL server for the tests: the database of the scale-out path (several receivers
and workers on one queue; deploy/kubernetes).

``postgres_server`` (session) runs Debian's PostgreSQL (``/usr/lib/postgresql/<version>/bin``,
installed by ``scripts/setup.sh test``) as a throwaway cluster: ``initdb`` into a temporary
folder, trust authentication, loopback TCP on a free port, fsync off; stopped and deleted at the
end. PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` user the Debian
package creates. ``postgres_url`` gives each test a new, empty database on it.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

USER = "dicom"
_databases = itertools.count(1)


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        pytest.fail("PostgreSQL is not installed: scripts/setup.sh test installs Debian's "
                    "postgresql package")
    return Path(found[-1]).parent


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """``postgresql+psycopg://dicom@127.0.0.1:<port>``: a running server; no database named."""
    bin_dir = _bin_dir()
    # in /tmp itself: the postgres user must reach it (pytest's folders are root's, 0700), and
    # the receiver points tempfile's default folder at its own scratch folder while it runs
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    run = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust",
                                        "-U", USER, "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(_as_server_user([*run, "-o", options, "-l", str(folder / "server.log"),
                                        "-w", "start"]),
                       check=True, capture_output=True, timeout=120)
        yield f"postgresql+psycopg://{USER}@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_server_user([*run, "-m", "immediate", "stop"]), capture_output=True,
                       timeout=60, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new empty database on the test server, as a SQLAlchemy URL."""
    import psycopg

    name = f"test_{os.getpid()}_{next(_databases)}"
    dsn = postgres_server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"
