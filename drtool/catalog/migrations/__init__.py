"""Alembic environment for the drtool catalog (shipped inside the package).

There is no ``alembic.ini``: :func:`drtool.catalog.store.alembic_config` builds
the configuration programmatically.
"""
