"""The activation browser: for a site and layer, a neuron or a direction; the top prompts with every
token shaded by its activation, and the histogram of all activations.

The scores are read by :mod:`interplab.store.neurons`: only the run's files of that site and layer
(as its commit manifest lists them), the ``act`` column viewed in place with numpy, one column of it
for a neuron or a matrix-vector product for a direction; the top prompts by a partial sort, and the
prompts' tokens from the ``prompts`` view (SQL, for just those prompts). The same answer by SQL alone
(:func:`browse_sql`: one statement scores every row of the ``activations`` view and returns the top
rows and the histogram, a second reads the top prompts' rows) serves store-like objects that have no
files to read, and is what the tests compare against.

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

import numpy as np

from interplab.store import neurons
from interplab.store.errors import StoreError
from interplab.store.fs import Location
from interplab.store.manifest import RunInfo

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
    """Top prompts (their tokens, each with its activation where one was captured) and the histogram.

    Read with :mod:`interplab.store.neurons` (the run's files of that site, scored with numpy) where
    the store has files to read; otherwise (a store-like object with SQL only) by SQL."""
    located = _locate(store, probe.run_id)
    if located is None:
        return browse_sql(store, probe)
    location, info = located
    try:
        scores = neurons.score_rows(
            location, info, probe.site, probe.layer, probe.head, neuron=probe.neuron, direction=probe.direction
        )
    except StoreError as exc:
        raise BrowserError(str(exc)) from None
    best = neurons.top_prompts(scores, probe.k, probe.k * TOP_ROWS_PER_PROMPT)
    histogram = _histogram(scores.score, probe.bins)
    ids = [int(scores.prompt_id[i]) for i in best.tolist()]
    top: list[dict[str, Any]] = [
        {"prompt_id": pid, "position": int(scores.position[i]), "activation": float(scores.score[i])}
        for pid, i in zip(ids, best.tolist())
    ]
    rows = np.flatnonzero(np.isin(scores.prompt_id, np.asarray(ids, np.int64))) if ids else np.zeros(0, np.int64)
    captured: dict[int, dict[int, dict[str, Any]]] = {}
    order = rows[np.lexsort((-scores.score[rows], scores.position[rows], scores.prompt_id[rows]))]
    for i in order.tolist():  # the largest over heads first: the first row of each position is kept
        captured.setdefault(int(scores.prompt_id[i]), {}).setdefault(
            int(scores.position[i]), {"row": i, "activation": float(scores.score[i])}
        )
    texts = _prompt_texts(store, probe.run_id, ids)
    missing = [p for p in ids if p not in texts]
    if missing:  # no prompts row: the captured tokens only
        wanted = np.asarray([c["row"] for p in missing for c in captured.get(p, {}).values()], np.int64)
        names = iter(neurons.tokens(location, scores, wanted))
        for p in missing:
            for c in captured.get(p, {}).values():
                c["token"] = next(names)
    prompts = {pid: _shaded(texts.get(pid), captured.get(pid, {})) for pid in ids}
    examples = [{**r, "tokens": prompts.get(r["prompt_id"], [])} for r in top]
    return {"d": scores.d, "examples": examples, "histogram": histogram}


def _locate(store: Any, run_id: str) -> tuple[Location, RunInfo] | None:
    """Where the run's files are and its record: a :class:`Store` (or a page's snapshot of one), or
    the catalog store that holds it; None for store-like objects without files."""
    try:
        if hasattr(store, "find"):  # a catalog: the store that holds the run, as its views read it
            entry, info = store.find(run_id)
            return entry.store.location, info
        if hasattr(store, "location") and hasattr(store, "run"):
            return store.location, store.run(run_id)
    except StoreError as exc:
        raise BrowserError(str(exc)) from None
    return None


def _histogram(score: np.ndarray, bins: int) -> dict[str, Any]:
    """Counts of ``bins`` equal bins from min to max (the last bin holds the max), as the SQL does."""
    if not len(score):
        return {"lo": None, "hi": None, "counts": [0] * bins, "n": 0}
    values = score.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    index = np.minimum(np.floor((values - lo) / max(hi - lo, 1e-30) * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins).tolist()
    return {"lo": lo, "hi": hi, "counts": counts, "n": int(sum(counts))}


def _prompt_texts(store: Any, run_id: str, prompt_ids: list[int]) -> dict[int, list[str]]:
    if not prompt_ids:
        return {}
    known = store.sql(
        "SELECT prompt_id, tokens FROM prompts WHERE run_id = $run_id AND prompt_id IN (SELECT unnest($ids))",
        {"run_id": run_id, "ids": prompt_ids},
    ).to_pylist()
    return {r["prompt_id"]: r["tokens"] for r in known}


def _shaded(tokens: list[str] | None, captured: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """A prompt's tokens with the activation of each captured position (``tokens`` None: the captured
    positions only, with their own tokens)."""
    shown: list[str | None]
    if tokens is None:
        positions = sorted(captured)
        shown = [captured[p].get("token") for p in positions]
    else:
        positions, shown = list(range(len(tokens))), list(tokens)
    return [{"position": p, "token": t, "activation": captured.get(p, {}).get("activation")} for p, t in zip(positions, shown)]


def browse_sql(store: Any, probe: Probe) -> dict[str, Any]:
    """:func:`browse` by SQL over the ``activations`` and ``prompts`` views alone."""
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
