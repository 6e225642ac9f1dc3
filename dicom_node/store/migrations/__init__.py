"""Schema migrations of the index (Alembic), run by :func:`dicom_node.store.db.make_engine`.

The revisions are in ``versions/``, oldest first: ``0001`` is the baseline, the tables as they were
when migrations began. Every process that opens the database (receiver, workers, CLI commands)
brings it to head first, in one transaction: on SQLite that transaction begins with
``BEGIN IMMEDIATE`` (the engine's ``begin`` event), on PostgreSQL it takes an advisory lock, so
processes that start at the same moment wait for each other and the migrations run once.

A database made by an earlier build, before migrations (tables, no ``alembic_version``), is adopted
by the baseline itself: it creates only the tables that are missing and adds the columns that
``create_all`` never added to an existing table, then Alembic records the revision as usual.

A database at a revision this build does not know was upgraded by a newer dicom-node: it is
refused (:class:`~dicom_node.errors.ConfigError`) rather than used with a schema the code does not
know.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from dicom_node.errors import ConfigError
from dicom_node.log import get_logger

log = get_logger()

#: The folder of env.py and versions/ (a plain folder of the installed package).
SCRIPT_LOCATION = Path(__file__).parent

#: Key of the PostgreSQL advisory lock held while the schema is checked and upgraded ("dcmnode").
PG_LOCK_KEY = 0x64636D6E6F6465


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the package's scripts; with ``connection``, env.py runs on it."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this build knows."""
    head = script_directory().get_current_head()
    assert head is not None, "dicom_node/store/migrations/versions holds no revision"
    return head


def current_revision(connection: Connection) -> str | None:
    """The database's revision; None when it has no ``alembic_version`` (new, or pre-migrations)."""
    return MigrationContext.configure(connection).get_current_revision()


def _known(revision: str) -> bool:
    return any(script.revision == revision for script in script_directory().walk_revisions())


def check_known(connection: Connection, revision: str | None) -> None:
    """Refuse a database upgraded by a newer dicom-node (a revision missing from this build)."""
    if revision is None or _known(revision):
        return
    url = connection.engine.url.render_as_string(hide_password=True)
    raise ConfigError(
        f"database {url}: its schema is at revision {revision!r}, which this build of dicom-node "
        f"does not know (its newest is {head_revision()!r}): a newer dicom-node upgraded it. "
        "Upgrade dicom-node to that version or later (or restore the backup taken before that "
        "upgrade); this build does not run on it.")


def upgrade(engine: Engine) -> None:
    """Bring the database to head: new, pre-migrations (adopted) or older; refuse a newer one."""
    with engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE, the database's write lock
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        current = current_revision(connection)
        check_known(connection, current)
        head = head_revision()
        if current == head:
            return
        command.upgrade(alembic_config(connection), "head")
        log.info("database_schema_upgraded", from_revision=current or "none", to_revision=head)
