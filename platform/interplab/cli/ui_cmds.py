"""``interplab ui``: serve the web dashboard over a store (``docs/dashboard.md``).

Bad options (a non-loopback address without ``--tokens``, a missing store, an unreadable tokens
path) print ``error: ...`` and exit with code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from interplab.store.cli_options import stores_options


@click.command("ui")
@stores_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback needs --tokens.")
@click.option("--port", default=8300, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--tokens",
    envvar="INTERPLAB_SERVE_TOKENS",
    default=None,
    metavar="PATH",
    help="Login tokens: the model service's tokens file or directory (env INTERPLAB_SERVE_TOKENS).",
)
@click.option(
    "--jobs-address",
    envvar="RAY_API_SERVER_ADDRESS",
    default=None,
    help="Ray dashboard / Jobs API URL for the Jobs page, e.g. http://HEAD:8265 (env RAY_API_SERVER_ADDRESS).",
)
@click.option("--ray-address", envvar="RAY_ADDRESS", default=None, help="Ray cluster (HEAD:6379) for the Served models page.")
@click.option("--token-file", "ray_token_file", default=None, help="The Ray cluster's auth token file (else $RAY_AUTH_TOKEN).")
def ui(
    store_uris: tuple[str, ...],
    catalog_file: str | None,
    host: str,
    port: int,
    tokens: str | None,
    jobs_address: str | None,
    ray_address: str | None,
    ray_token_file: str | None,
) -> None:
    """Serve the dashboard: runs, result pages, activation browser, SQL console, jobs, served models."""
    from pydantic import ValidationError

    from interplab.store import StoreError
    from interplab.ui.config import UIConfig

    try:
        config = UIConfig(
            store=", ".join(store_uris) or catalog_file,
            host=host,
            port=port,
            tokens=Path(tokens) if tokens else None,
            jobs_address=jobs_address,
            ray_address=ray_address,
            ray_token_file=ray_token_file,
        )
        store = _open(store_uris, catalog_file)
        from interplab.ui.app import create_app

        app = create_app(config, store)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "options"
            click.echo(f"error: {where}: {err['msg'].removeprefix('Value error, ')}", err=True)
        sys.exit(2)
    except (StoreError, ValueError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    import uvicorn

    login = "login required" if config.login_required else "loopback, read-only" + (" (log in to stop jobs)" if tokens else "")
    where = getattr(store, "uri", None) or ", ".join(s.name for s in store.stores)
    click.echo(f"interplab dashboard on http://{_url_host(host)}:{port}/ over {where} ({login})")
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("INTERPLAB_UI_LOG_LEVEL", "warning"))


def _open(store_uris: tuple[str, ...], catalog_file: str | None) -> Any:
    """One store as a :class:`Store` (each page then lists its runs once); several, or a catalog, as
    the :class:`~interplab.store.Catalog` that reads them as one (views with ``store`` and ``team``)."""
    from interplab.store.catalog import open_for_cli

    catalog = open_for_cli(store_uris, catalog_file)
    if len(catalog.stores) == 1:
        return catalog.stores[0].store
    return catalog


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def register(cli: click.Group) -> None:
    cli.add_command(ui)
