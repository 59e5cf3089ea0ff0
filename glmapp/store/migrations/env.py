"""Alembic environment: runs on the connection the store hands over (no alembic.ini, no URL here).

`render_as_batch` makes later ALTERs work on SQLite (which rebuilds a table to change it); on PostgreSQL
it is a no-op.
"""

from alembic import context

from glmapp.store.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
