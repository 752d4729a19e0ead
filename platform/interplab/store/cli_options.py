"""The store options shared by CLI commands: ``--store`` (one store) and ``--store``/``--catalog``
(commands that read several stores at once)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

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


F = TypeVar("F", bound=Callable[..., Any])


def stores_options(fn: F) -> F:
    """``--store URI`` (repeatable) and ``--catalog FILE``: what a reading command reads."""
    fn = click.option(
        "--catalog",
        "catalog_file",
        default=None,
        metavar="FILE",
        help="Read every store a catalog file lists (default when neither --store nor "
        f"${STORE_ENV} is given and one exists: $INTERPLAB_CATALOG or ~/.config/interplab/stores.toml).",
    )(fn)
    return click.option(
        "--store",
        "store_uris",
        multiple=True,
        metavar="URI",
        help=f"A store to read (repeatable; one store: env {STORE_ENV}, default {DEFAULT_STORE}).",
    )(fn)
