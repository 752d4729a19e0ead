"""What each kind's run page shows, read from the store's views with parameterised SQL.

Each function returns plain JSON-able data: the page embeds it as a JSON data block and the
browser draws it (``static/*.js``), so no value from the store is ever pasted into HTML or script.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _rows(store: Any, sql: str, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = store.sql(sql, params or None).to_pylist()
    return rows


def _has(store: Any, view: str) -> bool:
    return view in store.views()


def _clean(value: Any) -> Any:
    """NaN/inf as None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def patching(store: Any, run_id: str) -> dict[str, Any]:
    """Heatmap panels, one per (sweep, method): layer x position cells (or layer x head, the head
    grid; a sweep by layer, position and head is shown per head, averaged over positions)."""
    rows = _rows(
        store,
        "SELECT sweep, method, layer, position, head, value, normalized FROM patching "
        "WHERE run_id = $run_id ORDER BY sweep, method, layer, position NULLS FIRST, head NULLS FIRST",
        run_id=run_id,
    )
    tokens: list[str] = []
    if _has(store, "prompts"):
        found = _rows(store, "SELECT tokens FROM prompts WHERE run_id = $run_id AND prompt_id = 0", run_id=run_id)
        tokens = list(found[0]["tokens"]) if found else []
    baselines = (
        _rows(store, "SELECT sweep, name, value FROM baselines WHERE run_id = $run_id ORDER BY sweep, name", run_id=run_id)
        if _has(store, "baselines")
        else []
    )
    panels: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["sweep"], r["method"])
        panel = panels.setdefault(key, {"sweep": r["sweep"], "method": r["method"], "cells": {}, "axis": None})
        if r["head"] is not None:
            axis, x = ("head (mean over positions)" if r["position"] is not None else "head"), r["head"]
        elif r["position"] is not None:
            axis, x = "position", r["position"]
        else:
            axis, x = "layer", 0
        panel["axis"] = axis
        cell = panel["cells"].setdefault((r["layer"], x), {"value": 0.0, "normalized": 0.0, "n": 0})
        cell["value"] += r["value"]
        cell["normalized"] += r["normalized"]
        cell["n"] += 1
    out = []
    for panel in panels.values():
        cells = [
            {
                "layer": layer,
                "x": x,
                "value": _clean(c["value"] / c["n"]),
                "normalized": _clean(c["normalized"] / c["n"]),
            }
            for (layer, x), c in sorted(panel["cells"].items())
        ]
        out.append({"sweep": panel["sweep"], "method": panel["method"], "axis": panel["axis"], "cells": cells})
    return {"panels": out, "tokens": tokens, "baselines": [{k: _clean(v) for k, v in b.items()} for b in baselines]}


def circuit(store: Any, run_id: str, max_edges: int) -> dict[str, Any]:
    """Per method: the graph's edges (the ``max_edges`` largest by |score|, plus every circuit edge),
    the faithfulness curves and the summary row."""
    methods = [
        r["method"]
        for r in _rows(store, "SELECT DISTINCT method FROM edges WHERE run_id = $run_id ORDER BY method", run_id=run_id)
    ]
    graphs = []
    for method in methods:
        total = _rows(store, "SELECT count(*) AS n FROM edges WHERE run_id = $run_id AND method = $m", run_id=run_id, m=method)
        edges = _rows(
            store,
            "SELECT src, dst, src_layer, dst_layer, score, in_circuit FROM edges WHERE run_id = $run_id AND method = $m "
            "ORDER BY in_circuit DESC, abs(score) DESC, src, dst LIMIT $k",
            run_id=run_id,
            m=method,
            k=max_edges,
        )
        graphs.append(
            {"method": method, "n_edges": total[0]["n"], "edges": [{k: _clean(v) for k, v in e.items()} for e in edges]}
        )
    curves = (
        _rows(
            store,
            "SELECT method, rule, absolute, n_edges, fraction, kept, value, faithfulness FROM faithfulness "
            "WHERE run_id = $run_id ORDER BY method, rule, absolute, n_edges",
            run_id=run_id,
        )
        if _has(store, "faithfulness")
        else []
    )
    summary = (
        _rows(store, "SELECT * EXCLUDE (run_id) FROM circuit_summary WHERE run_id = $run_id ORDER BY method", run_id=run_id)
        if _has(store, "circuit_summary")
        else []
    )
    return {
        "graphs": graphs,
        "curves": [{k: _clean(v) for k, v in c.items()} for c in curves],
        "summary": [{k: _clean(v) for k, v in s.items()} for s in summary],
    }


def grafting(store: Any, run_id: str) -> dict[str, Any]:
    """Rank tables: per experiment, variant (and layers, epoch) x eval set of mean ranks; the deltas."""
    evals = (
        _rows(
            store,
            "SELECT experiment, variant, layers, epoch, eval_set, mean_rank, mean_logprob, n, n_options FROM grafting "
            "WHERE run_id = $run_id ORDER BY experiment, variant, layers, epoch NULLS FIRST, eval_set",
            run_id=run_id,
        )
        if _has(store, "grafting")
        else []
    )
    tables = []
    for experiment in sorted({r["experiment"] for r in evals}):
        part = [r for r in evals if r["experiment"] == experiment]
        sets = sorted({r["eval_set"] for r in part})
        lines: dict[tuple[Any, ...], dict[str, Any]] = {}
        for r in part:
            key = (r["variant"], r["layers"], r["epoch"])
            line = lines.setdefault(key, {"variant": r["variant"], "layers": r["layers"], "epoch": r["epoch"], "ranks": {}})
            line["ranks"][r["eval_set"]] = _clean(r["mean_rank"])
        tables.append(
            {"experiment": experiment, "eval_sets": sets, "rows": list(lines.values()), "n_options": part[0]["n_options"]}
        )
    deltas = (
        _rows(
            store,
            "SELECT name, experiment, delta, n_tensors, n_params, dtype, norm, bytes FROM deltas WHERE run_id = $run_id ORDER BY name",
            run_id=run_id,
        )
        if _has(store, "deltas")
        else []
    )
    return {"tables": tables, "deltas": [{k: _clean(v) for k, v in d.items()} for d in deltas]}


def capture(store: Any, run_id: str, max_prompts: int = 50) -> dict[str, Any]:
    """Coverage: rows, prompts and positions per (site, layer) (no vector is read); the first prompts."""
    cover = _rows(
        store,
        "SELECT site, layer, count(*) AS n_rows, count(DISTINCT prompt_id) AS n_prompts, "
        "count(DISTINCT position) AS n_positions, count(DISTINCT head) AS n_heads FROM activations "
        "WHERE run_id = $run_id GROUP BY site, layer ORDER BY site, layer",
        run_id=run_id,
    )
    prompts = _rows(
        store,
        "SELECT prompt_id, n_tokens, tokens FROM prompts WHERE run_id = $run_id ORDER BY prompt_id LIMIT $k",
        run_id=run_id,
        k=max_prompts,
    )
    total = _rows(store, "SELECT count(*) AS n FROM prompts WHERE run_id = $run_id", run_id=run_id)[0]["n"]
    return {"coverage": cover, "prompts": prompts, "n_prompts": total}


def run_tables(store: Any, run_id: str) -> list[dict[str, Any]]:
    """Rows per view for one run (one query over every view with a ``run_id``)."""
    views = [v for v in store.views() if v != "runs" and not v.startswith("activations_d")]
    if not views:
        return []
    counts = " UNION ALL ".join(f"SELECT '{v}' AS view, count(*) AS n FROM \"{v}\" WHERE run_id = $run_id" for v in views)
    rows = _rows(store, f"SELECT view, n FROM ({counts}) WHERE n > 0 ORDER BY view", run_id=run_id)
    return [{"view": r["view"], "rows": r["n"]} for r in rows]


def pretty_json(text: Any) -> str:
    """A JSON column (``spec``, ``provenance``) indented for reading; the template escapes it."""
    if text is None:
        return ""
    try:
        return json.dumps(json.loads(text) if isinstance(text, str) else text, indent=2, sort_keys=True)
    except (TypeError, ValueError):
        return str(text)
