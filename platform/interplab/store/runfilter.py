"""Which runs a checked query can read from the activation views, from its DuckDB parse tree.

A query over a store of 10,000 files that asks for one run should not make DuckDB bind the file list
of every run (:mod:`interplab.store.query` then gives it views over only those runs' files). The
answer must never be too small, so the analysis is deliberately narrow; anything else gives None
(read through the full views):

* every table the query reads is ``runs``, ``activations``/``activations_d<d>`` or a CTE of the
  query (no other view, which might read the activations itself; no CTE named like a view);
* every reference to an activation view is the only table in the FROM of its SELECT, and that
  SELECT's WHERE has, among its top-level AND terms, ``run_id = 'R'`` / ``run_id = $param`` or
  ``run_id IN ('R1', 'R2', ...)`` (``run_id`` unqualified, or qualified with that table's alias).

Rows of other runs can then not reach any result: the WHERE of the one SELECT that reads the view
drops them before anything else sees them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

ACTIVATION_VIEW = re.compile(r"^activations(_d\d+)?$")
_FREE = frozenset({"runs"})  # views that never read data files


def runs_read(tree: dict[str, Any], params: Mapping[str, Any] | None) -> frozenset[str] | None:
    """The run ids whose activation rows the query (``json_serialize_sql`` output) can read; None
    when the query does not read an activation view or when that cannot be shown (module doc)."""
    ctes: set[str] = set()
    tables: list[dict[str, Any]] = []
    selects: list[dict[str, Any]] = []
    for node in _nodes(tree.get("statements")):
        kind = node.get("type")
        if kind == "SHOW_REF":
            return None
        if kind == "BASE_TABLE":
            tables.append(node)
        elif kind == "SELECT_NODE":
            selects.append(node)
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            ctes.update(str(item.get("key", "")).lower() for item in cte_map.get("map", []))
    if any(ACTIVATION_VIEW.match(name) or name in _FREE for name in ctes):
        return None
    reads = []
    for table in tables:
        name = str(table.get("table_name", "")).lower()
        if table.get("schema_name") or table.get("catalog_name"):
            return None
        if ACTIVATION_VIEW.match(name):
            reads.append(table)
        elif name not in ctes and name not in _FREE:
            return None
    if not reads:
        return None
    constrained: dict[int, frozenset[str]] = {}
    for select in selects:
        source = select.get("from_table")
        if isinstance(source, dict) and any(source is table for table in reads):
            names = {str(source.get("alias") or source.get("table_name", "")).lower()}
            runs = _where_runs(select.get("where_clause"), names, params)
            if runs is not None:
                constrained[id(source)] = runs
    if any(id(table) not in constrained for table in reads):
        return None
    return frozenset().union(*constrained.values())


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _nodes(item)


def _where_runs(where: Any, aliases: set[str], params: Mapping[str, Any] | None) -> frozenset[str] | None:
    """The run ids the top-level AND terms of ``where`` allow (their intersection), or None."""
    found: frozenset[str] | None = None
    for term in _conjuncts(where):
        runs = _term_runs(term, aliases, params)
        if runs is not None:
            found = runs if found is None else found & runs
    return found


def _conjuncts(expr: Any) -> list[Any]:
    if isinstance(expr, dict) and expr.get("type") == "CONJUNCTION_AND":
        return [term for child in expr.get("children", []) for term in _conjuncts(child)]
    return [expr]


def _term_runs(term: Any, aliases: set[str], params: Mapping[str, Any] | None) -> frozenset[str] | None:
    if not isinstance(term, dict):
        return None
    if term.get("type") == "COMPARE_EQUAL":
        left, right = term.get("left"), term.get("right")
        if _is_run_id(right, aliases):
            left, right = right, left
        if not _is_run_id(left, aliases):
            return None
        value = _string(right, params)
        return None if value is None else frozenset({value})
    if term.get("type") == "COMPARE_IN":
        children = term.get("children") or []
        if not children or not _is_run_id(children[0], aliases):
            return None
        values = [_string(child, params) for child in children[1:]]
        if not values or any(v is None for v in values):
            return None
        return frozenset(v for v in values if v is not None)
    return None


def _is_run_id(expr: Any, aliases: set[str]) -> bool:
    if not isinstance(expr, dict) or expr.get("class") != "COLUMN_REF":
        return False
    names = [str(n).lower() for n in expr.get("column_names", [])]
    return names == ["run_id"] or (len(names) == 2 and names[1] == "run_id" and names[0] in aliases)


def _string(expr: Any, params: Mapping[str, Any] | None) -> str | None:
    """A string constant, or a named parameter given as a string; else None."""
    if not isinstance(expr, dict):
        return None
    if expr.get("class") == "CONSTANT":
        literal = expr.get("literal")
        if isinstance(literal, dict) and literal.get("kind") == "STRING" and isinstance(literal.get("text"), str):
            return str(literal["text"])
        return None
    if expr.get("class") == "PARAMETER" and params is not None:
        value = params.get(str(expr.get("identifier", "")))
        return value if isinstance(value, str) else None
    return None
