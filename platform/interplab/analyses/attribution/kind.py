"""The ``attribution`` job kind as interplab finds it: the ``interplab.kinds`` entry point ``attribution``.

Its spec and runner live in :mod:`.job`, its store views (``attributions``, ``attribution_summary``)
in ``views/*.sql``, its picture in :mod:`.plot` (drawn by :func:`plot_run` for ``interplab plot RUN_ID``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from interplab.analyses.attribution.job import AttributionRunner, AttributionSpec
from interplab.jobs import register_kind

if TYPE_CHECKING:
    from interplab.store import Store


def plot_run(store: Store, run_id: str, output: Path, method: str | None = None) -> list[Path]:
    """The prompts' tokens shaded by attribution, one panel per prompt and method (``method``: only that one)."""
    from interplab.analyses.attribution.plot import plot_attributions

    params: dict = {"run_id": run_id}
    where = "run_id = $run_id"
    if method is not None:
        where += " AND method = $method"
        params["method"] = method
    rows = store.sql(
        f"SELECT prompt_id, method, position, token, attribution FROM attributions WHERE {where} ORDER BY prompt_id, method, position",
        params,
    ).to_pylist()
    if not rows and method is not None:
        raise ValueError(f"run {run_id} has no attributions by method {method!r}; use itp or hipe")
    summary = {
        (r["prompt_id"], r["method"]): r
        for r in store.sql(
            "SELECT prompt_id, method, target, n_units, forwards FROM attribution_summary WHERE run_id = $run_id",
            {"run_id": run_id},
        ).to_pylist()
    }
    panels: dict[tuple[int, str], dict] = {}
    for r in rows:
        key = (r["prompt_id"], r["method"])
        if key not in panels:
            s = summary.get(key, {})
            panels[key] = {
                "title": f"prompt {key[0]} -> {s.get('target', '')!r}: {key[1]}, {s.get('forwards')} forwards "
                f"for {s.get('n_units')} units",
                "tokens": [],
                "attribution": [],
            }
        panels[key]["tokens"].append(r["token"])
        panels[key]["attribution"].append(r["attribution"])
    title = f"{run_id} ({store.run(run_id).model})"
    return [plot_attributions(list(panels.values()), output, title=title)]


register_kind("attribution", AttributionSpec, AttributionRunner(), plot=plot_run)
