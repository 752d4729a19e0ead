"""The runs table: one SQL read of the ``runs`` view, then filters, sort and pages.

The ``runs`` view gains provenance columns over time (``owner``, ``team``, ``store``, ``tags``);
every column is used when the view has it, and ``owner`` falls back to ``user`` when it has not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

FILTERS = ("owner", "team", "kind", "model", "status", "tag")
SORTABLE = ("created_at", "committed_at", "run_id", "kind", "model", "status", "owner", "team", "n_activation_rows")
SHOWN = ("run_id", "kind", "status", "model", "owner", "team", "store", "tags", "created_at", "n_activation_rows")


class QueryError(ValueError):
    """A bad filter, sort key or page (the message names the parameter and what is allowed)."""


@dataclass(frozen=True)
class RunQuery:
    filters: dict[str, str] = field(default_factory=dict)
    sort: str = "created_at"
    descending: bool = True
    page: int = 1
    page_size: int = 50

    @classmethod
    def from_params(cls, params: dict[str, str], page_size: int) -> RunQuery:
        filters = {k: params[k] for k in FILTERS if params.get(k)}
        sort = params.get("sort") or "created_at"
        if sort not in SORTABLE:
            raise QueryError(f"sort={sort!r} is not a column to sort by; allowed: {', '.join(SORTABLE)}")
        order = params.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise QueryError(f"order={order!r}: use 'asc' or 'desc'")
        try:
            page = int(params.get("page") or 1)
        except ValueError:
            raise QueryError(f"page={params.get('page')!r} is not a number") from None
        if page < 1:
            raise QueryError(f"page={page}: pages count from 1")
        return cls(filters=filters, sort=sort, descending=order == "desc", page=page, page_size=page_size)


@dataclass
class RunPage:
    rows: list[dict[str, Any]]
    total: int
    pages: int
    choices: dict[str, list[str]]  # the values each filter can take, for the drop-downs
    columns: list[str]


def tags_of(value: Any) -> list[str]:
    """A run's tags, whether the view holds them as a list or as JSON text."""
    if value is None:
        return []
    if isinstance(value, list):
        return [str(t) for t in value]
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return [t.strip() for t in value.split(",") if t.strip()]
        if isinstance(parsed, list):
            return [str(t) for t in parsed]
        if isinstance(parsed, dict):
            return [f"{k}={v}" if v not in (None, "", True) else str(k) for k, v in parsed.items()]
    return [str(value)]


def normalise(row: dict[str, Any]) -> dict[str, Any]:
    """One ``runs`` row with the provenance names the dashboard shows (``owner``, ``tags`` as a list)."""
    out = dict(row)
    if out.get("owner") is None:
        out["owner"] = row.get("user")
    out["tags"] = tags_of(row.get("tags"))
    out.setdefault("team", None)
    out.setdefault("store", None)
    return out


def all_runs(store: Any) -> list[dict[str, Any]]:
    return [normalise(r) for r in store.sql("SELECT * FROM runs").to_pylist()]


def query_runs(runs: list[dict[str, Any]], q: RunQuery) -> RunPage:
    choices = {
        name: sorted({str(r[name]) for r in runs if r.get(name) is not None})
        for name in ("owner", "team", "kind", "model", "status")
    }
    choices["tag"] = sorted({t for r in runs for t in r["tags"]})
    kept = [r for r in runs if _matches(r, q.filters)]
    present = [r for r in kept if r.get(q.sort) is not None]
    missing = [r for r in kept if r.get(q.sort) is None]
    present.sort(key=lambda r: (r[q.sort], r["run_id"]), reverse=q.descending)
    ordered = present + missing  # runs without the value last, whichever the direction
    pages = max(1, -(-len(ordered) // q.page_size))
    start = (min(q.page, pages) - 1) * q.page_size
    columns = [c for c in SHOWN if any(r.get(c) not in (None, []) for r in runs) or c in ("run_id", "kind", "status")]
    return RunPage(rows=ordered[start : start + q.page_size], total=len(ordered), pages=pages, choices=choices, columns=columns)


def _matches(row: dict[str, Any], filters: dict[str, str]) -> bool:
    for name, wanted in filters.items():
        if name == "tag":
            if wanted not in row["tags"]:
                return False
        elif str(row.get(name)) != wanted:
            return False
    return True
