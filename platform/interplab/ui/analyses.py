"""What the run pages of the store-reading analyses show: ``partition`` (the dictionary and its
regions' top members), ``probe`` (accuracy per layer) and ``attribution`` (each prompt's tokens
with their attributions). Read from the kinds' views with parameterised SQL; plain JSON-able data,
embedded as a JSON data block or rendered by autoescaping templates (see :mod:`interplab.ui.results`).
"""

from __future__ import annotations

from typing import Any

from interplab.ui.results import _clean, _has, _rows

CONTEXT_BEFORE, CONTEXT_AFTER = 8, 2  # tokens shown around a region member, as the ``context`` column


def partition(store: Any, run_id: str, max_regions: int = 40, max_members: int = 5) -> dict[str, Any]:
    """The dictionary (size, metric, threshold), and its largest ``max_regions`` regions, each with
    its exemplar and top ``max_members`` members; every member with the tokens around it from the
    source run's ``prompts`` (the member's own token marked), else the ``context`` column."""
    dictionary = (
        _rows(
            store,
            "SELECT site, metric, threshold, threshold_rule, percentile, n_rows, n_regions, d, build_seconds, assign_seconds "
            "FROM dictionaries WHERE run_id = $run_id",
            run_id=run_id,
        )
        if _has(store, "dictionaries")
        else []
    )
    regions = (
        _rows(
            store,
            "SELECT region, n_members, mean_distance, max_distance, source_run, prompt_id, position, head, token "
            "FROM exemplars WHERE run_id = $run_id ORDER BY n_members DESC, region LIMIT $k",
            run_id=run_id,
            k=max_regions,
        )
        if _has(store, "exemplars")
        else []
    )
    wanted = [r["region"] for r in regions]
    members = (
        _rows(
            store,
            "SELECT region, rank, source_run, prompt_id, position, head, token, distance, context FROM region_members "
            "WHERE run_id = $run_id AND list_contains($regions, region) AND rank < $m ORDER BY region, rank",
            run_id=run_id,
            regions=wanted,
            m=max_members,
        )
        if _has(store, "region_members") and wanted
        else []
    )
    prompts = _prompts_of(store, members)
    by_region: dict[int, list[dict[str, Any]]] = {}
    for m in members:
        tokens = prompts.get((m["source_run"], m["prompt_id"]))
        window: list[dict[str, Any]] = []
        if tokens is not None and m["position"] is not None and 0 <= m["position"] < len(tokens):
            lo, hi = max(0, m["position"] - CONTEXT_BEFORE), min(len(tokens), m["position"] + 1 + CONTEXT_AFTER)
            window = [{"position": p, "token": tokens[p], "member": p == m["position"]} for p in range(lo, hi)]
        by_region.setdefault(m["region"], []).append({**{k: _clean(v) for k, v in m.items()}, "window": window})
    assigned = (
        _rows(
            store, "SELECT count(*) AS n, count(DISTINCT region) AS regions FROM regions WHERE run_id = $run_id", run_id=run_id
        )[0]
        if _has(store, "regions")
        else {"n": 0, "regions": 0}
    )
    return {
        "dictionary": {k: _clean(v) for k, v in dictionary[0].items()} if dictionary else None,
        "regions": [{**{k: _clean(v) for k, v in r.items()}, "members": by_region.get(r["region"], [])} for r in regions],
        "n_assigned": assigned["n"],
        "n_assigned_regions": assigned["regions"],
    }


def _prompts_of(store: Any, members: list[dict[str, Any]]) -> dict[tuple[str, int], list[str]]:
    keys = sorted({(m["source_run"], m["prompt_id"]) for m in members if m["source_run"] is not None})
    if not keys or not _has(store, "prompts"):
        return {}
    rows = _rows(
        store,
        "SELECT run_id, prompt_id, tokens FROM prompts WHERE list_contains($runs, run_id) AND list_contains($ids, prompt_id)",
        runs=sorted({k[0] for k in keys}),
        ids=sorted({k[1] for k in keys}),
    )
    return {(r["run_id"], r["prompt_id"]): list(r["tokens"] or []) for r in rows}


def probe(store: Any, run_id: str) -> dict[str, Any]:
    """Accuracy per (site, layer): train, held-out and the majority-class floor; the chart's series
    are per site."""
    rows = (
        _rows(
            store,
            "SELECT site, layer, position, label, n_classes, d, n_train, n_test, train_accuracy, test_accuracy, "
            "majority, test_loss FROM probes WHERE run_id = $run_id ORDER BY site, layer NULLS FIRST",
            run_id=run_id,
        )
        if _has(store, "probes")
        else []
    )
    return {"probes": [{k: _clean(v) for k, v in r.items()} for r in rows]}


def attribution(store: Any, run_id: str, max_prompts: int = 50) -> dict[str, Any]:
    """Per (prompt, method): the target, the cost (forwards, passes) and every token with its
    attribution (None for tokens that were not perturbed)."""
    summary = (
        _rows(
            store,
            "SELECT prompt_id, method, target, perturbation, n_tokens, n_units, base_logprob, forwards, passes, rounds "
            "FROM attribution_summary WHERE run_id = $run_id ORDER BY prompt_id, method LIMIT $k",
            run_id=run_id,
            k=max_prompts,
        )
        if _has(store, "attribution_summary")
        else []
    )
    tokens = (
        _rows(
            store,
            'SELECT prompt_id, method, position, token, unit, attribution, "window" FROM attributions '
            "WHERE run_id = $run_id AND list_contains($ids, prompt_id) ORDER BY prompt_id, method, position",
            run_id=run_id,
            ids=sorted({s["prompt_id"] for s in summary}),
        )
        if _has(store, "attributions") and summary
        else []
    )
    by_key: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for t in tokens:
        by_key.setdefault((t["prompt_id"], t["method"]), []).append(
            {"position": t["position"], "token": t["token"], "unit": t["unit"], "attribution": _clean(t["attribution"])}
        )
    return {
        "prompts": [
            {**{k: _clean(v) for k, v in s.items()}, "tokens": by_key.get((s["prompt_id"], s["method"]), [])} for s in summary
        ]
    }
