"""The activations a probe is trained on: one vector per prompt at one token position, per site.

Either read from a committed run's stored activations (:func:`stored_features`: a capture run of
the same prompts, through :meth:`Store.export`), or captured in-process through the backend's
``run`` (:func:`captured_features`). Both give ``{site: Float[n_prompts, d]}`` in float32, row ``i``
being prompt ``i`` at ``position`` (negative counts from each prompt's end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from interplab.engine.sites import Site
from interplab.jobs.errors import SpecError

if TYPE_CHECKING:
    from interplab.engine.backend import Backend
    from interplab.store import Store


def captured_features(
    model: Backend, texts: Sequence[str], sites: Sequence[Site], position: int, batch_size: int
) -> dict[Site, torch.Tensor]:
    """Run ``model`` over ``texts`` in batches of ``batch_size`` and keep ``sites`` at ``position``."""
    parts: dict[Site, list[torch.Tensor]] = {site: [] for site in sites}
    for start in range(0, len(texts), batch_size):
        batch = model.tokenize(list(texts[start : start + batch_size]))
        out = model.run(batch, capture=list(sites), positions=[position], logits="none")
        for site in sites:
            parts[site].append(out.cache[site][:, 0].reshape(batch.size, -1).float().cpu())
    return {site: torch.cat(chunks) for site, chunks in parts.items()}


def stored_features(store: Store, run_id: str, sites: Sequence[Site], position: int, n_prompts: int) -> dict[Site, torch.Tensor]:
    """The activations of ``sites`` at ``position`` for prompts ``0..n_prompts-1`` of committed run ``run_id``.

    Raises :class:`SpecError` (at ``activations_run`` / ``position``) when the run lacks a site, a
    prompt, or the position."""
    from interplab.store import StoreError

    lengths = _prompt_lengths(store, run_id, n_prompts)
    target = lengths + position if position < 0 else np.full(n_prompts, position)
    out = {}
    for site in sites:
        try:
            acts, index = store.export(run_id, str(site), with_index=True)
        except StoreError as exc:
            raise SpecError("activations_run", str(exc), run_id, f"a committed run that captured {site}") from None
        prompt_ids, positions = index["prompt_id"], index["position"]
        keep = (prompt_ids < n_prompts) & (positions == target[np.clip(prompt_ids, 0, n_prompts - 1)])
        rows = np.full(n_prompts, -1)
        rows[prompt_ids[keep]] = np.nonzero(keep)[0]
        missing = np.nonzero(rows < 0)[0]
        if len(missing):
            first = int(missing[0])
            stored = sorted(set(positions[prompt_ids == first].tolist()))
            raise SpecError(
                "position",
                f"run {run_id} has no {site} activation of prompt {first} at position {position} "
                f"(token {int(target[first])} of {int(lengths[first])}); it stored positions {stored[:8] or 'none'}",
                position,
                "a position the capture run stored (capture with positions: all, or this position)",
            )
        out[site] = torch.from_numpy(np.ascontiguousarray(acts[rows], dtype=np.float32))
    return out


def _prompt_lengths(store: Store, run_id: str, n_prompts: int) -> np.ndarray:
    rows = store.sql(
        "SELECT prompt_id, n_tokens FROM prompts WHERE run_id = $run AND prompt_id < $n", {"run": run_id, "n": n_prompts}
    ).to_pydict()
    lengths = np.full(n_prompts, -1)
    lengths[np.asarray(rows["prompt_id"], dtype=np.int64)] = np.asarray(rows["n_tokens"], dtype=np.int64)
    if (lengths < 0).any():
        first = int(np.nonzero(lengths < 0)[0][0])
        raise SpecError(
            "activations_run",
            f"run {run_id} has no prompt {first} in its prompts table (it holds {len(rows['prompt_id'])} of the "
            f"dataset's {n_prompts} prompts)",
            run_id,
            "a capture run over the same prompts as 'dataset'",
        )
    return lengths


def check_input_run(store: Store, run_id: str, model: Backend, model_name: str, texts: Sequence[str]) -> None:
    """The run exists, is committed, captured ``model_name`` and holds exactly ``texts``: by their
    fingerprint where the run recorded one (capture runs do), else by the token ids of its
    ``prompts`` table. Otherwise :class:`SpecError` at ``activations_run``."""
    from interplab.jobs.datasets import fingerprint
    from interplab.store import StoreError

    try:
        info = store.run(run_id)
    except StoreError as exc:
        raise SpecError("activations_run", str(exc), run_id, f"a committed run of store {store.uri}") from None
    if info.status != "committed":
        raise SpecError("activations_run", f"run {run_id} is {info.status}", run_id, "a committed run")
    if info.model is not None and info.model != model_name:
        raise SpecError(
            "activations_run",
            f"run {run_id} captured model {info.model!r} but this spec's model is {model_name!r}",
            run_id,
            f"model: {info.model}",
        )
    allowed = "a capture run whose prompts are the dataset's, in the same order"
    recorded = info.provenance.get("prompts_sha256")
    if recorded is not None:
        if recorded != fingerprint(list(texts)):
            raise SpecError(
                "activations_run",
                f"run {run_id} captured other prompts than this spec's dataset "
                f"({info.provenance.get('n_prompts', '?')} prompts, fingerprint {recorded}; the dataset has {len(texts)} "
                f"prompts, fingerprint {fingerprint(list(texts))})",
                run_id,
                allowed,
            )
        return
    stored = store.sql(
        "SELECT prompt_id, token_ids FROM prompts WHERE run_id = $run ORDER BY prompt_id", {"run": run_id}
    ).to_pylist()
    batch = model.tokenize(list(texts))
    for i, text in enumerate(texts):
        ids = batch.input_ids[i, : int(batch.lengths[i])].tolist()
        if i >= len(stored) or stored[i]["prompt_id"] != i or list(stored[i]["token_ids"]) != ids:
            raise SpecError(
                "activations_run",
                f"run {run_id} captured other prompts than this spec's dataset (they differ from dataset prompt {i}, {text!r}; "
                f"the run holds {len(stored)} prompts, the dataset {len(texts)})",
                run_id,
                allowed,
            )
