"""Checks of a ``run_stage`` call's joins and vocabulary subset, shared by every backend: one clear
error before any layer runs."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from interplab.engine.plan import Fork
from interplab.engine.tokens import TokenBatch


def join_rows(join: torch.Tensor | Fork) -> int:
    """Rows a join adds to the batch."""
    return join.size if isinstance(join, Fork) else int(join.shape[0])


def check_joins(
    batch: TokenBatch,
    start: int,
    stop: int,
    hidden: torch.Tensor | None,
    joins: Mapping[int, torch.Tensor | Fork],
    capturing: bool,
) -> None:
    """One clear error for ``run_stage`` joins that cannot run."""
    if capturing:
        raise ValueError("run_stage: joins cannot be combined with capture or grad (the batch grows between layers)")
    outside = sorted(layer for layer in joins if not start <= layer < stop)
    if outside:
        raise ValueError(f"run_stage: joins at layers {outside} lie outside the stage's layers [{start}, {stop})")
    joined = sum(join_rows(j) for j in joins.values())
    first = 0 if hidden is None else int(hidden.shape[0])
    if hidden is None and start == 0:
        first = batch.input_ids.shape[0] - joined  # the rest start at the embedding
    elif hidden is None and not isinstance(joins.get(start), torch.Tensor):
        raise ValueError(f"run_stage: no rows at layer {start}: pass hidden or joins[{start}]")
    if first + joined != batch.input_ids.shape[0]:
        raise ValueError(f"run_stage: hidden and joins hold {first + joined} rows, the batch has {batch.input_ids.shape[0]}")
    present = first
    for layer in sorted(joins):
        join = joins[layer]
        if isinstance(join, Fork) and join.size and (int(join.rows.min()) < 0 or int(join.rows.max()) >= present):
            raise ValueError(
                f"run_stage: the fork at layer {layer} copies rows {join.rows.tolist()}, but rows 0..{present - 1} are there"
            )
        present += join_rows(join)


def check_vocab(vocab: torch.Tensor, with_head: bool, d_vocab: int) -> torch.Tensor:
    """``vocab`` as ``Long[k]`` token ids of a ``d_vocab``-token model, or one clear error."""
    if not with_head:
        raise ValueError("vocab selects logits columns: it needs with_head=True")
    vocab = torch.as_tensor(vocab)
    if vocab.ndim != 1 or vocab.dtype not in (torch.int32, torch.int64) or len(vocab) == 0:
        raise ValueError(f"vocab must be a non-empty 1-d tensor of token ids, got {vocab.dtype} {list(vocab.shape)}")
    bad = vocab[(vocab < 0) | (vocab >= d_vocab)]
    if len(bad):
        raise ValueError(f"vocab holds token ids {bad[:5].tolist()} outside [0, {d_vocab})")
    return vocab.long()
