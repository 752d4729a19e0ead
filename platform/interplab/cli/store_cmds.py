"""``interplab sql``, ``interplab runs`` and ``interplab store``: query and manage the activation store(s).

Bad input (refused or malformed SQL, unknown run or saved query, missing parameter, a path that is
not a store) prints one ``error: ...`` line on stderr and exits with code 2.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import sys
from datetime import date, datetime, timedelta, timezone
from typing import Any

import click

from interplab.store import Catalog, RunInfo, StoreError
from interplab.store.catalog import USAGE_DIMENSIONS, deletion_refused, gc_plan, open_for_cli, usage
from interplab.store.cli_options import stores_options
from interplab.store.sqlfiles import saved_queries, saved_query

_CELL = 48


def register(cli: click.Group) -> None:
    """Attach the store commands to the ``interplab`` group."""
    cli.add_command(sql)
    cli.add_command(runs)
    cli.add_command(store_group)


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


def _format_option(fn):
    return click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)(fn)


@click.command()
@click.argument("query", required=False)
@click.option("--saved", "saved_name", metavar="NAME", help="Run a saved query from storage/queries/ by name.")
@click.option("--param", "params", multiple=True, metavar="K=V", help="A saved-query parameter (repeatable).")
@click.option("--list-saved", is_flag=True, help="List the saved queries and their parameters.")
@_format_option
@stores_options
@_errors
def sql(
    query: str | None,
    saved_name: str | None,
    params: tuple[str, ...],
    list_saved: bool,
    fmt: str,
    store_uris: tuple[str, ...],
    catalog_file: str | None,
) -> None:
    """Run one read-only SQL query (SELECT) over the store's views, or a saved query. With several
    --store, or a catalog, the views cover every store and gain store and team columns.

    \b
    interplab sql "SELECT run_id, status FROM runs"
    interplab sql --saved nearest --param run_id=R --param site=resid_pre --param layer=3 --param 'vector=[...]'
    interplab sql --catalog ~/.config/interplab/stores.toml "SELECT team, count(*) FROM runs GROUP BY team"
    """
    if list_saved:
        for name, q in saved_queries().items():
            click.echo(f"{name}({q.usage()})  {q.description}")
        return
    if (query is None) == (saved_name is None):
        raise StoreError("give either a QUERY or --saved NAME (not both)")
    if params and saved_name is None:
        raise StoreError("--param only applies to --saved queries")
    with open_for_cli(store_uris, catalog_file) as stores:
        if saved_name is not None:
            saved = saved_query(saved_name)
            table = stores.sql(saved.sql, saved.bind(_parse_params(params)) or None)
        else:
            if query is None:  # not reached: exactly one of QUERY and --saved was checked above
                raise StoreError("give either a QUERY or --saved NAME (not both)")
            table = stores.sql(query)
        _emit(table.column_names, table.to_pylist(), fmt)


# -- runs ----------------------------------------------------------------------------------------


def _filter_options(fn):
    for option in reversed(
        [
            click.option("--owner", default=None, help="Only runs of this owner."),
            click.option("--team", default=None, help="Only runs of this team."),
            click.option("--kind", default=None, help="Only runs of this kind (capture, patching, ...)."),
            click.option("--model", default=None, help="Only runs of this model."),
            click.option("--tag", "tags", multiple=True, help="Only runs with this tag (repeatable: all of them)."),
            click.option("--status", type=click.Choice(["running", "committed", "failed"]), default=None),
            click.option("--since", default=None, metavar="DATE", help="Created on or after DATE (YYYY-MM-DD or ISO time, UTC)."),
            click.option("--until", default=None, metavar="DATE", help="Created on or before DATE (a day counts whole)."),
        ]
    ):
        fn = option(fn)
    return fn


_FILTERS = ("owner", "team", "kind", "model", "tags", "status", "since", "until")


@click.group(invoke_without_command=True)
@stores_options
@_filter_options
@_format_option
@click.pass_context
def runs(ctx: click.Context, store_uris: tuple[str, ...], catalog_file: str | None, fmt: str, **filters: Any) -> None:
    """List runs (default; filter with --owner --team --kind --model --tag --status --since --until),
    show, annotate (tag, describe, pin), delete, or garbage-collect."""
    ctx.obj = {"store_uris": store_uris, "catalog_file": catalog_file, "filters": filters}
    if ctx.invoked_subcommand is None:
        ctx.invoke(runs_list, store_uris=(), catalog_file=None, fmt=fmt, **filters)


def _open(ctx: click.Context, store_uris: tuple[str, ...], catalog_file: str | None) -> Catalog:
    obj = ctx.obj or {}
    if not store_uris and not catalog_file:
        store_uris, catalog_file = obj.get("store_uris") or (), obj.get("catalog_file")
    return open_for_cli(store_uris, catalog_file)


@runs.command("list")
@_filter_options
@_format_option
@stores_options
@click.pass_context
@_errors
def runs_list(ctx: click.Context, store_uris: tuple[str, ...], catalog_file: str | None, fmt: str, **filters: Any) -> None:
    """List runs, oldest first."""
    stores = _open(ctx, store_uris, catalog_file)
    given = (ctx.obj or {}).get("filters") or {}  # filters given before the subcommand (runs --owner x list)
    merged: dict[str, Any] = {k: filters.get(k) or given.get(k) for k in _FILTERS}
    merged["tags"] = tuple(filters.get("tags") or ()) + tuple(given.get("tags") or ())
    selected = select_runs(stores.runs(), **merged)
    columns = ["run_id", "kind", "status", "model", "created_at", "owner", "team", "host", "rows", "tags", "pinned", "error"]
    if len(stores.stores) > 1:
        columns.insert(1, "store")
    rows = [
        {
            "run_id": r.run_id,
            "store": r.store,
            "kind": r.kind,
            "status": r.status,
            "model": r.model,
            "created_at": r.created_at,
            "owner": r.owner,
            "team": r.team,
            "host": r.host,
            "rows": sum(r.rows.values()),
            "tags": list(r.tags),
            "pinned": r.pinned,
            "error": r.error,
        }
        for r in selected
    ]
    _emit(columns, rows, fmt)


def select_runs(
    runs_: list[RunInfo],
    *,
    owner: str | None = None,
    team: str | None = None,
    kind: str | None = None,
    model: str | None = None,
    tags: tuple[str, ...] = (),
    status: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> list[RunInfo]:
    """The runs every given filter accepts (dates compare with ``created_at``, in UTC)."""
    start = _when(since, "--since", end_of_day=False)
    stop = _when(until, "--until", end_of_day=True)
    out = []
    for r in runs_:
        if owner is not None and r.owner != owner:
            continue
        if team is not None and r.team != team:
            continue
        if (kind is not None and r.kind != kind) or (model is not None and r.model != model):
            continue
        if status is not None and r.status != status:
            continue
        if tags and not set(tags) <= set(r.tags):
            continue
        if start is not None or stop is not None:
            created = _when(r.created_at, "created_at", end_of_day=False)
            if created is None or (start is not None and created < start) or (stop is not None and created >= stop):
                continue
        out.append(r)
    return out


def _when(text: str | None, option: str, *, end_of_day: bool) -> datetime | None:
    """A UTC time from ``YYYY-MM-DD`` or an ISO time; with ``end_of_day`` a bare date means the
    start of the next day (so ``--until DAY`` includes DAY)."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise StoreError(f"{option} {text!r}: expected a date YYYY-MM-DD or an ISO time like 2026-12-03T10:00") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    if end_of_day and len(text) == 10:
        value += timedelta(days=1)
    return value


@runs.command("show")
@click.argument("run_id")
@stores_options
@click.pass_context
@_errors
def runs_show(ctx: click.Context, run_id: str, store_uris: tuple[str, ...], catalog_file: str | None) -> None:
    """Show one run's status, full provenance, annotations and tables as JSON."""
    info = _open(ctx, store_uris, catalog_file).run(run_id)
    out = info.to_dict()
    out["sites"] = sorted({f"{f.site}" + ("" if f.layer is None else f".{f.layer}") for f in info.files if f.site})
    click.echo(json.dumps(out, indent=2, default=str))


def _annotated(info: RunInfo) -> str:
    pin = ", pinned" if info.pinned else ""
    desc = f", description: {info.description}" if info.description else ""
    return f"{info.run_id}: tags [{', '.join(info.tags)}]{pin}{desc}"


@runs.command("tag")
@click.argument("run_id")
@click.argument("tags", nargs=-1, required=True)
@click.option("--remove", is_flag=True, help="Remove the tags instead of adding them.")
@stores_options
@click.pass_context
@_errors
def runs_tag(
    ctx: click.Context, run_id: str, tags: tuple[str, ...], remove: bool, store_uris: tuple[str, ...], catalog_file: str | None
) -> None:
    """Add (or --remove) tags on a run."""
    entry, _ = _open(ctx, store_uris, catalog_file).find(run_id)
    info = entry.store.untag(run_id, *tags) if remove else entry.store.tag(run_id, *tags)
    click.echo(_annotated(info))


@runs.command("describe")
@click.argument("run_id")
@click.argument("text")
@stores_options
@click.pass_context
@_errors
def runs_describe(ctx: click.Context, run_id: str, text: str, store_uris: tuple[str, ...], catalog_file: str | None) -> None:
    """Set a run's description (the last one written wins)."""
    entry, _ = _open(ctx, store_uris, catalog_file).find(run_id)
    click.echo(_annotated(entry.store.describe(run_id, text)))


def _pin_command(name: str, pinned: bool) -> click.Command:
    @click.argument("run_id")
    @stores_options
    @click.pass_context
    @_errors
    def command(ctx: click.Context, run_id: str, store_uris: tuple[str, ...], catalog_file: str | None) -> None:
        entry, _ = _open(ctx, store_uris, catalog_file).find(run_id)
        click.echo(_annotated(entry.store.pin(run_id, pinned)))

    command.__doc__ = "Pin a run: runs gc never deletes it." if pinned else "Unpin a run."
    return runs.command(name)(command)


runs_pin = _pin_command("pin", True)
runs_unpin = _pin_command("unpin", False)


@runs.command("delete")
@click.argument("run_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Delete even a pinned run, or one other runs use as input or read files of.")
@stores_options
@click.pass_context
@_errors
def runs_delete(
    ctx: click.Context, run_id: str, yes: bool, force: bool, store_uris: tuple[str, ...], catalog_file: str | None
) -> None:
    """Delete a run and all its data.

    Refused (exit code 2) for a pinned run and for a run another run in the stores read depends on
    (names it in its inputs, or lists its files in its commit manifest), unless --force."""
    stores = _open(ctx, store_uris, catalog_file)
    entry, info = stores.find(run_id)
    refused = None if force else deletion_refused(info, stores.runs())
    if refused is not None:
        fixes = [f"unpin it (interplab runs unpin {run_id})"] if info.pinned else []
        if refused != "it is pinned":
            fixes.append("delete the runs that use it first")
        fix = " and ".join(fixes)
        raise StoreError(
            f"refused to delete run {run_id}: {refused}. {fix[0].upper()}{fix[1:]}, or pass --force "
            "to delete it anyway (runs that use it then lose that data)"
        )
    if not yes:
        click.confirm(f"delete {info.status} run {run_id} ({sum(info.rows.values())} rows)?", abort=True)
    entry.store.delete_run(run_id)
    click.echo(f"deleted {run_id}")


@runs.command("gc")
@click.option(
    "--older-than", "older_than", type=float, default=None, metavar="DAYS", help="Select runs created more than DAYS ago."
)
@click.option("--kind", "kinds", multiple=True, metavar="KIND", help="Select runs of this kind (repeatable).")
@click.option("--failed", is_flag=True, help="Select failed runs only.")
@click.option("--yes", is_flag=True, help="Delete the selected runs (default: a dry run that lists them).")
@click.option(
    "--abandoned-hours",
    "abandoned_hours",
    type=float,
    default=None,
    metavar="HOURS",
    help="Also mark runs still 'running' after HOURS as failed and clean their staging data.",
)
@_format_option
@stores_options
@click.pass_context
@_errors
def runs_gc(
    ctx: click.Context,
    older_than: float | None,
    kinds: tuple[str, ...],
    failed: bool,
    yes: bool,
    abandoned_hours: float | None,
    fmt: str,
    store_uris: tuple[str, ...],
    catalog_file: str | None,
) -> None:
    """Retention: delete runs by age, kind or failure (dry run unless --yes), and remove staging
    data nobody can see (failed runs' chunks, old temp files).

    Pinned runs, runs still running, and runs another run reuses (named in its inputs, or whose
    files its manifest lists, in any store read) are never deleted. Without --older-than, --kind or
    --failed only the staging data is cleaned.

    \b
    interplab runs gc --older-than 90 --kind capture          # list what would go
    interplab runs gc --older-than 90 --kind capture --yes    # delete it
    """
    stores = _open(ctx, store_uris, catalog_file)
    selecting = older_than is not None or bool(kinds) or failed
    if selecting:
        plan = gc_plan(stores.runs(), older_than_days=older_than, kinds=kinds, failed=failed)
        rows = [
            {
                "run_id": d.run.run_id,
                "store": d.run.store,
                "kind": d.run.kind,
                "status": d.run.status,
                "created_at": d.run.created_at,
                "owner": d.run.owner,
                "bytes": d.run.n_bytes,
                "action": (f"keep ({d.kept})" if d.kept else ("deleted" if yes else "would delete")),
            }
            for d in plan
        ]
        doomed = [d.run for d in plan if d.kept is None]
        if yes:
            by_name = {e.name: e.store for e in stores.stores}
            for run in doomed:
                by_name[str(run.store)].delete_run(run.run_id)
        _emit(["run_id", "store", "kind", "status", "created_at", "owner", "bytes", "action"], rows, fmt)
        total = sum(r.n_bytes for r in doomed)
        if fmt == "table":
            verb = "deleted" if yes else "would delete"
            hint = "" if yes or not doomed else "; run again with --yes to delete"
            click.echo(f"{verb} {len(doomed)} run(s), {_human(total)}; kept {len(plan) - len(doomed)}{hint}")
        if not yes:
            return
    for entry in stores.stores:
        report = entry.store.gc(abandoned_hours)
        prefix = f"{entry.name}: " if len(stores.stores) > 1 else ""
        click.echo(prefix + ", ".join(f"{k}: {v}" for k, v in report.items()), err=selecting and fmt != "table")


# -- store ---------------------------------------------------------------------------------------


@click.group("store")
def store_group() -> None:
    """The store as a whole: usage."""


@store_group.command("usage")
@click.option(
    "--by",
    "by",
    type=click.Choice(list(USAGE_DIMENSIONS)),
    multiple=True,
    help="Group by team, owner or kind (default: all three).",
)
@_format_option
@stores_options
@_errors
def store_usage(by: tuple[str, ...], fmt: str, store_uris: tuple[str, ...], catalog_file: str | None) -> None:
    """Bytes of committed data per team, owner and kind (from the commit manifests; a file several
    runs use counts once, for the run that wrote it)."""
    with open_for_cli(store_uris, catalog_file) as stores:
        rows = usage(stores.runs(), by or USAGE_DIMENSIONS)
    for row in rows:
        row["size"] = _human(row["bytes"])
    _emit(["by", "key", "runs", "files", "bytes", "size"], rows, fmt)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


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
