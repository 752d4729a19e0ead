"""The SQL console: one read-only query through the store's sandbox (:meth:`Store.sql`), or a saved
query (``storage/queries/*.sql``) with its parameters; results as a grid, CSV or Parquet."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from interplab.store.sqlfiles import saved_queries

FORMATS = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


def saved() -> list[dict[str, Any]]:
    """The saved queries: name, description, parameters and SQL text."""
    return [
        {
            "name": q.name,
            "description": q.description,
            "params": [{"name": p.name, "type": p.type, "default": p.default} for p in q.params],
            "sql": q.sql,
        }
        for q in saved_queries().values()
    ]


def run(store: Any, query: str | None, saved_name: str | None, params: dict[str, str]) -> pa.Table:
    """Run ``query``, or the saved query ``saved_name`` with ``params`` (strings, converted by type)."""
    if saved_name:
        given = {k: v for k, v in params.items() if v != ""}
        table: pa.Table = store.saved(saved_name, **given)
        return table
    table = store.sql(query or "")
    return table


def grid(table: pa.Table, limit: int) -> dict[str, Any]:
    """The first ``limit`` rows as text cells (vectors shortened), for the page's table."""
    rows = table.slice(0, limit).to_pylist()
    columns = table.column_names
    return {
        "columns": columns,
        "types": [str(t) for t in table.schema.types],
        "rows": [[_cell(r[c]) for c in columns] for r in rows],
        "total": table.num_rows,
        "shown": len(rows),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list):
        head = ", ".join(_cell(v) for v in value[:8])
        return f"[{head}{', …' if len(value) > 8 else ''}] ({len(value)})"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def serialise(table: pa.Table, fmt: str) -> bytes:
    """``table`` as CSV (list columns as JSON-like text) or Parquet."""
    sink = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, sink)
    elif fmt == "csv":
        columns = [
            pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())
            if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type)
            else col
            for col in table.columns
        ]
        pacsv.write_csv(pa.table(columns, names=table.column_names), sink)
    else:
        raise ValueError(f"format={fmt!r}: use one of {', '.join(FORMATS)}")
    return sink.getvalue()
