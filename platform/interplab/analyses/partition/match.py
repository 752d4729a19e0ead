"""Uses of a dictionary: matching two dictionaries, and nearest-exemplar distance as an OOD score.

**Matching.** Two dictionaries of the same width (one data stream through two layers, or through a
base and a finetuned model) pair by nearest neighbour under cosine similarity of their exemplars:
a region of ``b`` whose nearest ``a`` exemplar is at least ``min_similarity`` similar is
*preserved*, otherwise *new*; a region of ``a`` that no region of ``b`` reaches is *vanished*.
``mutual`` marks pairs that are each other's nearest neighbour.

**OOD score.** :func:`ood_scores` runs new prompts through a model, captures the dictionary's site
and returns each token's distance to its nearest exemplar: a token far from every exemplar lies
outside the region of activation space the dictionary was built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from interplab.analyses.partition.dictionary import Dictionary, DictionaryError
from interplab.analyses.partition.leader import prepare

if TYPE_CHECKING:
    from interplab.engine.backend import Backend

MATCH_SCHEMA = pa.schema(
    [
        ("dictionary", pa.string()),  # 'a' or 'b': which side the row's region belongs to
        ("other_run", pa.string()),
        ("region", pa.int32()),
        ("match_region", pa.int32()),
        ("similarity", pa.float32()),
        ("mutual", pa.bool_()),
        ("status", pa.string()),  # preserved | new (b side) ; preserved | vanished (a side)
    ]
)


def similarity_matrix(a: Dictionary, b: Dictionary) -> np.ndarray:
    """Cosine similarity ``[K_a, K_b]`` of the exemplars."""
    if a.d != b.d:
        raise DictionaryError(f"dictionaries of different widths cannot be matched: {a.d} vs {b.d}")
    ua = prepare(torch.from_numpy(a.vectors.astype(np.float32)), "cosine")
    ub = prepare(torch.from_numpy(b.vectors.astype(np.float32)), "cosine")
    return (ua @ ub.T).numpy()


def match_dictionaries(a: Dictionary, b: Dictionary, min_similarity: float = 0.9) -> pa.Table:
    """One row per region of each side (``MATCH_SCHEMA``): its nearest counterpart and status."""
    sim = similarity_matrix(a, b)
    best_a = sim.argmax(axis=1)  # for each a region: nearest b
    best_b = sim.argmax(axis=0)  # for each b region: nearest a
    rows: list[tuple[str, str | None, int, int, float, bool, str]] = []
    for j in range(b.size):
        i = int(best_b[j])
        s = float(sim[i, j])
        rows.append(("b", a.run_id, j, i, s, int(best_a[i]) == j, "preserved" if s >= min_similarity else "new"))
    reached = {int(best_b[j]) for j in range(b.size) if sim[best_b[j], j] >= min_similarity}
    for i in range(a.size):
        j = int(best_a[i])
        s = float(sim[i, j])
        preserved = i in reached or s >= min_similarity
        rows.append(("a", b.run_id, i, j, s, int(best_b[j]) == i, "preserved" if preserved else "vanished"))
    columns: list[tuple[Any, ...]] = list(zip(*rows, strict=True)) if rows else [() for _ in MATCH_SCHEMA]
    return pa.Table.from_arrays(
        [pa.array(list(c), f.type) for c, f in zip(columns, MATCH_SCHEMA, strict=True)], schema=MATCH_SCHEMA
    )


@dataclass(frozen=True)
class MatchSummary:
    preserved: int
    new: int
    vanished: int


def summarize_match(table: pa.Table) -> MatchSummary:
    side = table.column("dictionary").to_pylist()
    status = table.column("status").to_pylist()
    pairs = list(zip(side, status, strict=True))
    return MatchSummary(pairs.count(("b", "preserved")), pairs.count(("b", "new")), pairs.count(("a", "vanished")))


@dataclass(frozen=True)
class OodScores:
    """Per prompt: its tokens, each token's nearest region and its distance (the OOD score)."""

    tokens: list[list[str]]
    regions: list[np.ndarray]
    distances: list[np.ndarray]

    def prompt_scores(self, reduce: str = "max") -> np.ndarray:
        """One score per prompt: the ``max`` (default) or ``mean`` token distance."""
        fn = np.max if reduce == "max" else np.mean
        return np.array([float(fn(d)) for d in self.distances])


def ood_scores(
    model: Backend, prompts: Sequence[str], dictionary: Dictionary, site: str | None = None, batch_size: int = 16
) -> OodScores:
    """Nearest-exemplar distance of every token of ``prompts`` at the dictionary's site (or ``site``)."""
    where = site or dictionary.site
    if where is None:
        raise DictionaryError("the dictionary records no site; pass site= (e.g. 'resid_post.5')")
    parsed = model.validate_site(where)
    tokens: list[list[str]] = []
    regions: list[np.ndarray] = []
    distances: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        part = list(prompts[start : start + batch_size])
        with torch.no_grad():
            out = model.run(part, capture=[parsed], logits="last")
        acts = out.cache[parsed]
        lengths = out.batch.lengths.tolist()
        for row, n in enumerate(lengths):
            region, distance = dictionary.nearest(acts[row, :n].reshape(-1, dictionary.d).float())
            ids = out.batch.input_ids[row, :n].tolist()
            tokens.append([model.tokenizer.decode([t]) for t in ids])
            regions.append(region)
            distances.append(distance)
    return OodScores(tokens, regions, distances)
