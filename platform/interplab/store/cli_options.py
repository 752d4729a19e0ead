"""The ``--store`` option shared by every CLI command that touches the store."""

from __future__ import annotations

import click

from interplab.store.fs import DEFAULT_STORE, STORE_ENV

store_option = click.option(
    "--store",
    "store_uri",
    envvar=STORE_ENV,
    default=None,
    metavar="URI",
    help=f"Store: a directory or s3://bucket/prefix (env {STORE_ENV}; default {DEFAULT_STORE}).",
)
