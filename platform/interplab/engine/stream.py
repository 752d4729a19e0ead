"""Chunks of captured activations, as the engine streams them to consumers (the store's writer).

A :class:`CaptureChunk` is what :func:`capture_stream` (``HookedModel.capture_stream``) yields for
every batch of prompts; :func:`capture_into` writes the chunks of a prompt list into a sink. It only holds CPU tensors and plain Python values, so it can cross process
boundaries (Ray) and be written by a consumer that knows nothing about models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from interplab.engine.sites import Site, parse_sites
from interplab.engine.tokens import decode

if TYPE_CHECKING:
    from interplab.engine.backend import Backend, CaptureSink
    from interplab.engine.interventions import Intervention
    from interplab.engine.plan import Positions


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


# (texts, checked sites, positions, chunk index, first prompt id) -> the chunk
ChunkMaker = Callable[[Sequence[str], Sequence[Site], "Positions", int, int], CaptureChunk]


def capture_chunk(
    model: Backend,
    texts: Sequence[str],
    sites: Sequence[Site],
    positions: Positions,
    interventions: Sequence[Intervention],
    index: int,
    first_id: int,
) -> CaptureChunk:
    """Chunk ``index`` (prompts ``first_id..``): ``texts`` run once with ``sites`` captured, on the CPU."""
    result = model.run(texts, capture=sites, positions=positions, interventions=interventions, logits="none")
    batch = result.batch
    tokens = [[decode(model.tokenizer, [int(t)]) for t in batch.input_ids[i, : int(batch.lengths[i])]] for i in range(batch.size)]
    acts = {site: value.to("cpu") for site, value in result.cache.items()}
    return CaptureChunk(
        index=index,
        prompt_ids=list(range(first_id, first_id + batch.size)),
        token_ids=batch.input_ids.cpu(),
        lengths=batch.lengths.tolist(),
        tokens=tokens,
        positions=result.cache.positions,
        valid=result.cache.valid,
        acts=acts,
    )


def _checked(model: Backend, sites: Sequence[Site | str], batch_size: int) -> list[Site]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    return [model.validate_site(s) for s in parse_sites(list(sites))]


def capture_stream(
    model: Backend,
    prompts: Iterable[str],
    sites: Sequence[Site | str],
    *,
    batch_size: int = 16,
    positions: Positions = None,
    interventions: Sequence[Intervention] = (),
) -> Iterator[CaptureChunk]:
    """Capture ``sites`` over a prompt iterable of any size, one CPU chunk per batch."""
    checked = _checked(model, sites, batch_size)
    buffer: list[str] = []
    index = 0
    first_id = 0
    for text in prompts:
        buffer.append(text)
        if len(buffer) == batch_size:
            yield capture_chunk(model, buffer, checked, positions, interventions, index, first_id)
            index, first_id, buffer = index + 1, first_id + len(buffer), []
    if buffer:
        yield capture_chunk(model, buffer, checked, positions, interventions, index, first_id)


def capture_into(
    model: Backend,
    prompts: Sequence[str],
    sites: Sequence[Site | str],
    sink: CaptureSink,
    *,
    batch_size: int = 16,
    positions: Positions = None,
    dtype: str = "float16",
    skip_chunks: Iterable[int] = (),
    on_chunk: Callable[[int], None] | None = None,
    make_chunk: ChunkMaker | None = None,
) -> int:
    """Capture ``sites`` of every prompt into ``sink``: chunk ``i`` holds prompts
    ``[i * batch_size, (i + 1) * batch_size)``; ``skip_chunks`` are not run. Returns chunks written.
    ``make_chunk`` builds a chunk (default :func:`capture_chunk`; a remote model tokenises remotely)."""
    checked = _checked(model, sites, batch_size)
    skip = set(skip_chunks)
    texts = list(prompts)
    written = 0
    for index, first in enumerate(range(0, len(texts), batch_size)):
        if index in skip:
            continue
        part = texts[first : first + batch_size]
        make = make_chunk or (lambda texts, sites, pos, i, first_id: capture_chunk(model, texts, sites, pos, (), i, first_id))
        sink.write_capture_chunk(make(part, checked, positions, index, first), dtype=dtype)
        written += 1
        if on_chunk is not None:
            on_chunk(index)
    return written
