"""Alembic migrations of the store, applied by `glmapp.store.database.Database.migrate` at start."""
