"""The activation browser: for a site and layer, a neuron or a direction; the top prompts with every
token shaded by its activation, and the histogram of all activations. All of it is SQL over the
store's ``activations`` and ``prompts`` views, through the store's read-only sandbox.

One statement scores every row once (a materialised CTE) and returns both the top prompts (each
ranked by its largest activation) and the histogram's bins; a second one reads the activations of
just those prompts' tokens (a filter on ``prompt_id`` is pushed into the Parquet scan, so only their
rows are decoded).

A **stored direction** is a vector some run stored: a probe run's weights (``probe_weights``), a
partition run's exemplars (``exemplars``), or a row of a ``directions`` table any run may write
(``writer.write_table("directions", ...)`` with columns ``name``, ``site``, ``layer`` and ``vector``
``list<float>``: a difference of means, a patching direction, a vector from elsewhere).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

_SITE = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_K = 200
MAX_BINS = 200
TOP_ROWS_PER_PROMPT = 10  # rows read per wanted prompt before ranking by prompt instead


class BrowserError(ValueError):
    """A bad browser parameter: the message names the field and what it accepts."""


@dataclass(frozen=True)
class Probe:
    """What to read: ``neuron`` (an index into ``act``) or ``direction`` (a vector), never both."""

    run_id: str
    site: str
    layer: int | None
    head: int | None = None
    neuron: int | None = None
    direction: tuple[float, ...] | None = None
    k: int = 20
    bins: int = 40

    def __post_init__(self) -> None:
        if not _SITE.match(self.site):
            raise BrowserError(f"site={self.site!r}: a site kind such as 'resid_post'")
        if (self.neuron is None) == (self.direction is None):
            raise BrowserError("give exactly one of 'neuron' (an index) and 'direction' (a vector)")
        if self.neuron is not None and self.neuron < 0:
            raise BrowserError(f"neuron={self.neuron}: an index from 0")
        if not 1 <= self.k <= MAX_K:
            raise BrowserError(f"k={self.k}: between 1 and {MAX_K}")
        if not 1 <= self.bins <= MAX_BINS:
            raise BrowserError(f"bins={self.bins}: between 1 and {MAX_BINS}")


def parse_vector(text: str) -> tuple[float, ...]:
    """A pasted vector: a JSON list, or numbers separated by commas, spaces or new lines."""
    text = text.strip()
    if not text:
        raise BrowserError("direction: paste a vector, e.g. [0.1, -0.2, ...]")
    try:
        values = json.loads(text) if text.startswith("[") else [float(x) for x in re.split(r"[\s,;]+", text) if x]
    except ValueError as exc:
        raise BrowserError(f"direction: not a list of numbers ({exc})") from None
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
        raise BrowserError("direction: not a list of numbers")
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise BrowserError("direction: NaN or infinite values")
    return out


# Where stored directions come from: view -> SELECT of (run_id, name, site, layer, vector).
DIRECTION_SOURCES = {
    "directions": "SELECT run_id, name, site, layer, vector FROM directions",
    "probe_weights": "SELECT run_id, 'probe ' || site || coalesce('.' || layer, '') || ' class ' || CAST(class AS VARCHAR) AS name, "
    "site, layer, weight AS vector FROM probe_weights",
    "exemplars": "SELECT e.run_id, 'region ' || e.region AS name, d.site, NULL::INTEGER AS layer, e.vector "
    "FROM exemplars e JOIN dictionaries d USING (run_id)",
}


def _direction_sql(store: Any) -> str | None:
    views = set(store.views())
    parts = [
        f"SELECT '{view}' AS source, * FROM ({sql})"
        for view, sql in DIRECTION_SOURCES.items()
        if view in views and (view != "exemplars" or "dictionaries" in views)
    ]
    return " UNION ALL BY NAME ".join(parts) if parts else None


def stored_directions(store: Any) -> list[dict[str, Any]]:
    """Every stored direction's source, run, name, site, layer and width (not its values): rows of a
    ``directions`` table, probe weights (``probe_weights``), partition exemplars (``exemplars``)."""
    sql = _direction_sql(store)
    if sql is None:
        return []
    rows: list[dict[str, Any]] = store.sql(
        f"SELECT source, run_id, name, site, layer, len(vector) AS d FROM ({sql}) ORDER BY source, run_id, name"
    ).to_pylist()
    return rows


def stored_direction(store: Any, key: str) -> tuple[float, ...]:
    """The vector of the stored direction ``SOURCE|RUN_ID|NAME`` (as the browser's picker names it)."""
    source, _, rest = key.partition("|")
    run_id, _, name = rest.partition("|")
    sql = _direction_sql(store)
    if sql is None or source not in DIRECTION_SOURCES:
        raise BrowserError(f"stored direction {key!r}: this store holds no stored directions of that kind")
    rows = store.sql(
        f"SELECT vector FROM ({sql}) WHERE source = $source AND run_id = $run_id AND name = $name",
        {"source": source, "run_id": run_id, "name": name},
    ).to_pylist()
    if not rows:
        raise BrowserError(f"stored direction {name!r} of run {run_id!r} ({source}) not found")
    return tuple(float(v) for v in rows[0]["vector"])


def browsable(store: Any) -> list[dict[str, Any]]:
    """(run, site, layer) combinations with activations, and their widths (no vector is decoded)."""
    rows: list[dict[str, Any]] = store.sql(
        "SELECT run_id, site, layer, count(*) AS n_rows, count(DISTINCT head) AS n_heads FROM activations "
        "GROUP BY run_id, site, layer ORDER BY run_id, site, layer"
    ).to_pylist()
    return rows


def _score(probe: Probe) -> str:
    return "act[$neuron + 1]" if probe.neuron is not None else "list_inner_product(act::FLOAT[], $direction::FLOAT[])"


def _params(probe: Probe) -> dict[str, Any]:
    params: dict[str, Any] = {"run_id": probe.run_id, "site": probe.site, "layer": probe.layer, "head": probe.head}
    if probe.neuron is not None:
        params["neuron"] = probe.neuron
    else:
        params["direction"] = list(probe.direction or ())
    return params


_WHERE = "run_id = $run_id AND site = $site AND layer IS NOT DISTINCT FROM $layer AND ($head IS NULL OR head = $head)"


def width(store: Any, probe: Probe) -> int:
    """The vector width at the probe's site: from the run's commit manifest, else one row's ``len(act)``."""
    try:
        files = store.run(probe.run_id).files
    except (AttributeError, ValueError):  # a StoreError (unknown run) is a ValueError too
        files = []
    widths = {
        e.d
        for e in files
        if e.table == "activations"
        and e.site == probe.site
        and e.layer == probe.layer
        and e.d
        and (probe.head is None or e.head in (None, probe.head))
    }
    if len(widths) == 1:
        return int(widths.pop())
    rows = store.sql(
        f"SELECT len(act) AS d FROM activations WHERE {_WHERE} LIMIT 1",
        {"run_id": probe.run_id, "site": probe.site, "layer": probe.layer, "head": probe.head},
    ).to_pylist()
    if not rows:
        where = f"{probe.site}.{probe.layer}" + ("" if probe.head is None else f" head {probe.head}")
        raise BrowserError(f"run {probe.run_id!r} has no activations at {where}")
    d: int = rows[0]["d"]
    return d


def browse(store: Any, probe: Probe) -> dict[str, Any]:
    """Top prompts (their tokens, each with its activation where one was captured) and the histogram."""
    d = width(store, probe)
    if probe.neuron is not None and probe.neuron >= d:
        raise BrowserError(f"neuron={probe.neuron}: this site has {d} neurons (0..{d - 1})")
    if probe.direction is not None and len(probe.direction) != d:
        raise BrowserError(f"direction: {len(probe.direction)} numbers, but this site's vectors have {d}")
    rows_limit = probe.k * TOP_ROWS_PER_PROMPT
    sql = f"""
WITH scored AS MATERIALIZED (
    SELECT prompt_id, position, head, {_score(probe)} AS activation FROM activations WHERE {_WHERE}
),
stats AS (SELECT min(activation) AS lo, max(activation) AS hi, count(*) AS n FROM scored),
top AS (SELECT prompt_id, position, activation FROM scored ORDER BY activation DESC, prompt_id, position LIMIT {rows_limit}),
hist AS (
    SELECT least(CAST(floor((activation - lo) / greatest(hi - lo, 1e-30) * {probe.bins}) AS INTEGER), {probe.bins - 1}) AS bin,
           count(*) AS n
    FROM scored, stats GROUP BY bin
)
SELECT 'top' AS part, prompt_id, position, activation, NULL::INTEGER AS bin, NULL::BIGINT AS n,
       NULL::DOUBLE AS lo, NULL::DOUBLE AS hi FROM top
UNION ALL
SELECT 'hist', NULL, NULL, NULL, bin, hist.n, lo, hi FROM hist, stats
"""
    rows = store.sql(sql, _params(probe)).to_pylist()
    hist_rows = [r for r in rows if r["part"] == "hist"]
    counts = [0] * probe.bins
    lo = hi = None
    for r in hist_rows:
        counts[r["bin"]] = r["n"]
        lo, hi = r["lo"], r["hi"]
    ranked = sorted((r for r in rows if r["part"] == "top"), key=lambda r: (-r["activation"], r["prompt_id"], r["position"]))
    top: list[dict[str, Any]] = []
    for r in ranked:  # each prompt at its strongest token
        if all(t["prompt_id"] != r["prompt_id"] for t in top):
            top.append(r)
    if len(top) < probe.k and len(ranked) == rows_limit:  # a few prompts hold all the top rows: rank by prompt
        top = store.sql(
            f"SELECT prompt_id, arg_max(position, activation) AS position, max(activation) AS activation FROM "
            f"(SELECT prompt_id, position, {_score(probe)} AS activation FROM activations WHERE {_WHERE}) "
            f"GROUP BY prompt_id ORDER BY activation DESC, prompt_id LIMIT {probe.k}",
            _params(probe),
        ).to_pylist()
    top = top[: probe.k]
    prompts = _prompt_tokens(store, probe, [r["prompt_id"] for r in top])
    examples = [
        {
            "prompt_id": r["prompt_id"],
            "position": r["position"],
            "activation": r["activation"],
            "tokens": prompts.get(r["prompt_id"], []),
        }
        for r in top
    ]
    return {"d": d, "examples": examples, "histogram": {"lo": lo, "hi": hi, "counts": counts, "n": sum(counts)}}


def _prompt_tokens(store: Any, probe: Probe, prompt_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Each prompt's tokens (from ``prompts``, else the captured rows) with the activation of each
    captured position (the largest over heads when the site has heads and no head was chosen)."""
    if not prompt_ids:
        return {}
    params = {**_params(probe), "ids": prompt_ids}
    acts = store.sql(
        f"SELECT prompt_id, position, any_value(token) AS token, max({_score(probe)}) AS activation FROM activations "
        f"WHERE {_WHERE} AND prompt_id IN (SELECT unnest($ids)) GROUP BY prompt_id, position",
        params,
    ).to_pylist()
    known = store.sql(
        "SELECT prompt_id, tokens FROM prompts WHERE run_id = $run_id AND prompt_id IN (SELECT unnest($ids))",
        {"run_id": probe.run_id, "ids": prompt_ids},
    ).to_pylist()
    by_prompt: dict[int, dict[int, dict[str, Any]]] = {}
    for r in acts:
        by_prompt.setdefault(r["prompt_id"], {})[r["position"]] = {"token": r["token"], "activation": r["activation"]}
    out: dict[int, list[dict[str, Any]]] = {}
    texts = {r["prompt_id"]: r["tokens"] for r in known}
    for pid in prompt_ids:
        captured = by_prompt.get(pid, {})
        tokens = texts.get(pid)
        if tokens is None:  # no prompts row: the captured tokens only
            tokens = [captured[p]["token"] for p in sorted(captured)]
            positions = sorted(captured)
        else:
            positions = list(range(len(tokens)))
        out[pid] = [
            {"position": p, "token": t, "activation": captured.get(p, {}).get("activation")} for p, t in zip(positions, tokens)
        ]
    return out
