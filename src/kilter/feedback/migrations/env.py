"""Alembic environment for the feedback store.

Kilter passes an open connection in ``config.attributes["connection"]`` (see
``kilter.feedback.migrate``); the ``alembic`` command line instead reads the database from the
``KILTER_DB`` environment variable (a file path or a SQLAlchemy URL).
"""

import os

from alembic import context
from sqlalchemy import create_engine

from kilter.feedback.models import Base
from kilter.feedback.store import database_url

config = context.config


def _run(connection) -> None:
    # batch mode lets later revisions ALTER tables on SQLite, which cannot alter in place
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
elif context.is_offline_mode():
    context.configure(url=database_url(os.environ.get("KILTER_DB", "kilter.db")), target_metadata=Base.metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(database_url(os.environ.get("KILTER_DB", "kilter.db")))
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
