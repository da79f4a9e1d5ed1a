"""Alembic migrations for the state database (shipped as `reconciler.migrations`)."""
