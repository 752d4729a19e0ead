"""Chunks of captured activations, as the engine streams them to consumers (the store's writer).

A :class:`CaptureChunk` is what :meth:`interplab.engine.HookedModel.capture_stream` yields for every
batch of prompts. It only holds CPU tensors and plain Python values, so it can cross process
boundaries (Ray) and be written by a consumer that knows nothing about models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from interplab.engine.sites import Site


@dataclass(frozen=True)
class CaptureChunk:
    """One batch of captured activations.

    Attributes:
        index: chunk number in the stream (0, 1, ...). For a fixed dataset and batch size it is
            stable across re-runs, so ``(run_id, index)`` is an idempotent key for a chunk write.
        prompt_ids: global index of each row's prompt in the dataset, ``[b]``.
        token_ids: token ids, right-padded, ``Long[b, s]``.
        lengths: unpadded length of each row, ``[b]``.
        tokens: the token strings of each row, unpadded (``len(tokens[i]) == lengths[i]``).
        positions: the token positions captured for each row, ``Long[b, p]``; entries where
            ``valid`` is False are padding and must be ignored.
        valid: ``Bool[b, p]``; False where a row has fewer than ``p`` captured positions.
        acts: per site, a CPU tensor. Whole-stream sites (``resid_*``, ``attn_out``, ``mlp_out``,
            ``embed``, ``final``, ``mlp_post``, ``logits``) have shape ``[b, p, d]``; per-head sites
            (``head_out``, ``z``, ``q``, ``k``, ``v``) have shape ``[b, p, h, d]`` (all heads of
            the layer when ``site.head`` is None, else ``h == 1`` for that head); ``pattern`` has
            shape ``[b, h, p, s]`` (attention probabilities of the captured query positions over all
            key positions).
    """

    index: int
    prompt_ids: list[int]
    token_ids: torch.Tensor
    lengths: list[int]
    tokens: list[list[str]]
    positions: torch.Tensor
    valid: torch.Tensor
    acts: dict[Site, torch.Tensor] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return len(self.prompt_ids)
