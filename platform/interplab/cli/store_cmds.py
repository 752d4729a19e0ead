"""``interplab sql`` and ``interplab runs``: query and manage the activation store.

Bad input (refused or malformed SQL, unknown run or saved query, missing parameter, a path that is
not a store) prints one ``error: ...`` line on stderr and exits with code 2.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import sys
from datetime import date, datetime
from typing import Any

import click

from interplab.store import StoreError, open_store
from interplab.store.cli_options import store_option
from interplab.store.sqlfiles import saved_queries, saved_query

_CELL = 48


def register(cli: click.Group) -> None:
    """Attach the store commands to the ``interplab`` group."""
    cli.add_command(sql)
    cli.add_command(runs)


def _errors(fn):
    """Turn store errors into one stderr line and exit code 2 (usage), OSError into exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StoreError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


@click.command()
@click.argument("query", required=False)
@click.option("--saved", "saved_name", metavar="NAME", help="Run a saved query from storage/queries/ by name.")
@click.option("--param", "params", multiple=True, metavar="K=V", help="A saved-query parameter (repeatable).")
@click.option("--list-saved", is_flag=True, help="List the saved queries and their parameters.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@store_option
@_errors
def sql(
    query: str | None, saved_name: str | None, params: tuple[str, ...], list_saved: bool, fmt: str, store_uri: str | None
) -> None:
    """Run one read-only SQL query (SELECT) over the store's views, or a saved query.

    \b
    interplab sql "SELECT run_id, status FROM runs"
    interplab sql --saved nearest --param run_id=R --param site=resid_pre --param layer=3 --param 'vector=[...]'
    """
    if list_saved:
        for name, q in saved_queries().items():
            click.echo(f"{name}({q.usage()})  {q.description}")
        return
    if (query is None) == (saved_name is None):
        raise StoreError("give either a QUERY or --saved NAME (not both)")
    if params and saved_name is None:
        raise StoreError("--param only applies to --saved queries")
    with open_store(store_uri, create=False) as store:
        if saved_name is not None:
            saved = saved_query(saved_name)
            table = store.sql(saved.sql, saved.bind(_parse_params(params)) or None)
        else:
            if query is None:  # not reached: exactly one of QUERY and --saved was checked above
                raise StoreError("give either a QUERY or --saved NAME (not both)")
            table = store.sql(query)
        _emit(table.column_names, table.to_pylist(), fmt)


@click.group(invoke_without_command=True)
@store_option
@click.pass_context
def runs(ctx: click.Context, store_uri: str | None) -> None:
    """List runs (default), show, delete, or garbage-collect failed staging data."""
    ctx.obj = {"store_uri": store_uri}
    if ctx.invoked_subcommand is None:
        ctx.invoke(runs_list, store_uri=store_uri)


def _uri(ctx: click.Context, store_uri: str | None) -> str | None:
    return store_uri or (ctx.obj or {}).get("store_uri")


@runs.command("list")
@click.option("--status", type=click.Choice(["running", "committed", "failed"]))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@store_option
@click.pass_context
@_errors
def runs_list(ctx: click.Context, store_uri: str | None, status: str | None = None, fmt: str = "table") -> None:
    """List runs, oldest first."""
    store = open_store(_uri(ctx, store_uri), create=False)
    rows = [
        {
            "run_id": r.run_id,
            "kind": r.kind,
            "status": r.status,
            "model": r.model,
            "created_at": r.created_at,
            "user": r.user,
            "host": r.host,
            "rows": sum(r.rows.values()),
            "error": r.error,
        }
        for r in store.runs(status)
    ]
    _emit(["run_id", "kind", "status", "model", "created_at", "user", "host", "rows", "error"], rows, fmt)


@runs.command("show")
@click.argument("run_id")
@store_option
@click.pass_context
@_errors
def runs_show(ctx: click.Context, run_id: str, store_uri: str | None) -> None:
    """Show one run's status, provenance and tables as JSON."""
    info = open_store(_uri(ctx, store_uri), create=False).run(run_id)
    out = info.to_dict()
    out["sites"] = sorted({f"{f.site}" + ("" if f.layer is None else f".{f.layer}") for f in info.files if f.site})
    click.echo(json.dumps(out, indent=2, default=str))


@runs.command("delete")
@click.argument("run_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@store_option
@click.pass_context
@_errors
def runs_delete(ctx: click.Context, run_id: str, yes: bool, store_uri: str | None) -> None:
    """Delete a run and all its data."""
    store = open_store(_uri(ctx, store_uri), create=False)
    info = store.run(run_id)
    if not yes:
        click.confirm(f"delete {info.status} run {run_id} ({sum(info.rows.values())} rows)?", abort=True)
    store.delete_run(run_id)
    click.echo(f"deleted {run_id}")


@runs.command("gc")
@click.option(
    "--older-than",
    "older_than",
    type=float,
    default=None,
    metavar="HOURS",
    help="Also fail and clean runs still 'running' after this many hours (abandoned writers).",
)
@store_option
@click.pass_context
@_errors
def runs_gc(ctx: click.Context, older_than: float | None, store_uri: str | None) -> None:
    """Remove staging data of failed (and, with --older-than, abandoned) runs."""
    report = open_store(_uri(ctx, store_uri), create=False).gc(older_than)
    click.echo(", ".join(f"{k}: {v}" for k, v in report.items()))


# -- output ------------------------------------------------------------------------------------


def _parse_params(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise StoreError(f"--param {item!r}: expected K=V")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if not isinstance(value, (str, int, float, bool, type(None))):
        return str(value)
    return value


def _emit(columns: list[str], rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps([{c: _plain(r.get(c)) for c in columns} for r in rows]))
        return
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([_csv_cell(_plain(r.get(c))) for c in columns])
        return
    cells = [[_table_cell(_plain(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    click.echo(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else value


def _table_cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list) and len(value) > 4:
        head = ", ".join(_short(v) for v in value[:3])
        return f"[{head}, … ({len(value)})]"
    text = json.dumps(value) if isinstance(value, (list, dict)) else _short(value)
    return text if len(text) <= _CELL else text[: _CELL - 1] + "…"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
