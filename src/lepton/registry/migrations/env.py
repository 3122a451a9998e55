"""Alembic environment: migrations run on the connection the registry hands over."""

from alembic import context

from lepton.registry.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
context.run_migrations()
