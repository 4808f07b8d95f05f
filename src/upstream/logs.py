"""Logging set-up for the entry points (the CLI and the component glue); the library only logs."""

from __future__ import annotations

import logging

#: Libraries whose INFO lines ("Found credentials in environment variables.") are noise here.
QUIET = ("botocore", "boto3", "urllib3", "alembic", "mlflow.store")


def setup_logging(fmt: str = "%(message)s") -> None:
    logging.basicConfig(level=logging.INFO, format=fmt)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
