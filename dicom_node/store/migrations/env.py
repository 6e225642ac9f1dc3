"""Alembic's environment for dicom-node's schema.

In the node, :func:`dicom_node.store.migrations.upgrade` runs the migrations on a connection it has
already opened a transaction on (``config.attributes["connection"]``): the check and every
migration are one transaction, so processes that start together migrate once.

From the ``alembic`` command (developers; ``[tool.alembic]`` in pyproject.toml names this folder),
the database is given with ``-x url=...``: ``alembic revision --autogenerate -x url=sqlite:///x.db``
compares the models with a database at head; ``alembic upgrade head --sql -x url=postgresql://``
prints the SQL without running it.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from dicom_node.store.db import Base

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # ALTER on SQLite means copying the table; autogenerate writes batch operations for it.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url")
    if not url:
        raise SystemExit("name the database: alembic ... -x url=sqlite:///path/to/dicom-node.db")
    return url


_connection = config.attributes.get("connection")
if _connection is not None:
    _run(_connection)
elif context.is_offline_mode():
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    from dicom_node.store.db import make_engine

    with make_engine(_url(), upgrade=False).begin() as _conn:
        _run(_conn)
