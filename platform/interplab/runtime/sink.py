"""Stage-side store writes: each stage writes the sites it owns for a chunk, straight to the store.

Activation files have the same paths as a single-process capture (``site=/layer=/chunk-<index>``),
so a chunk written again — a retry after a stage died, or a resumed run split differently — replaces
its files and no row is ever stored twice. Each stage records its part of a chunk under its own
chunk-marker table (``activations.stage<start>-<stop>``) so stages never overwrite each other's
markers; the first stage also writes the chunk's ``prompts`` rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from interplab.engine.stream import CaptureChunk

if TYPE_CHECKING:
    from interplab.engine.cache import ActivationCache
    from interplab.runtime.task import StageTask


@dataclass(frozen=True)
class StoreSink:
    """Where a stage writes one chunk: the store, the run, the chunk index, the storage dtype, and
    the token strings of the chunk's rows (for the store's ``token`` column)."""

    store_uri: str
    run_id: str
    chunk: int
    dtype: str = "float16"
    tokens: tuple[tuple[str, ...], ...] = ()


def marker_table(start: int, stop: int) -> str:
    return f"activations.stage{start}-{stop}"


def write_stage_chunk(writer, chunk: CaptureChunk, *, marker: str, with_prompts: bool, dtype: str = "float16") -> int:
    """Write ``chunk``'s sites (and its prompts when ``with_prompts``); return the rows written."""
    import torch

    valid = chunk.valid.bool().cpu().numpy()
    positions = chunk.positions.long().cpu().numpy()
    rows, cols = np.nonzero(valid)
    pos = positions[rows, cols]
    prompt_id = np.asarray(chunk.prompt_ids, dtype=np.int64)[rows]
    token_ids = chunk.token_ids.long().cpu().numpy()
    token_id = token_ids[rows, pos]
    token = [chunk.tokens[i][j] for i, j in zip(rows.tolist(), pos.tolist())]
    entries, skipped, n_rows = [], [], 0
    for site, tensor in chunk.acts.items():
        if not site.kind.fixed_width:
            skipped.append(str(site))
            continue
        store_dtype = "float32" if tensor.dtype == torch.bfloat16 else dtype
        arr = tensor.detach().cpu().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().cpu().numpy()
        selected = arr[rows, cols]
        if arr.ndim == 3:
            entries.append(
                writer.write_activations(
                    chunk.index, site.kind.value, site.layer, None, prompt_id, pos, token_id, token, selected, dtype=store_dtype
                )
            )
            n_rows += len(prompt_id)
            continue
        n, h, d = selected.shape
        head = site.head if site.head is not None else np.tile(np.arange(h, dtype=np.int32), n)
        entries.append(
            writer.write_activations(
                chunk.index,
                site.kind.value,
                site.layer,
                head,
                np.repeat(prompt_id, h),
                np.repeat(pos, h),
                np.repeat(token_id, h),
                [t for t in token for _ in range(h)],
                selected.reshape(n * h, d),
                dtype=store_dtype,
            )
        )
        n_rows += n * h
    if skipped:
        warnings.warn(f"pattern sites {skipped} are not stored (variable key length; see interplab.store.capture)", stacklevel=2)
    if with_prompts:
        writer.write_table("prompts", _prompts_table(chunk, token_ids), chunk=chunk.index)
    writer.finish_chunk(marker, chunk.index, entries)
    return n_rows


def _prompts_table(chunk: CaptureChunk, token_ids: np.ndarray) -> pa.Table:
    lengths = [int(n) for n in chunk.lengths]
    return pa.table(
        {
            "prompt_id": pa.array(chunk.prompt_ids, pa.int64()),
            "n_tokens": pa.array(lengths, pa.int32()),
            "token_ids": pa.array([token_ids[i, :n].tolist() for i, n in enumerate(lengths)], pa.list_(pa.int32())),
            "tokens": pa.array([list(t[:n]) for t, n in zip(chunk.tokens, lengths)], pa.list_(pa.string())),
        }
    )


class StageWriters:
    """A stage's store writers, one per ``(store, run)``, opened on first use: the stage writes the
    captures of the sites it owns for a chunk straight to the run (see the module docstring)."""

    def __init__(self, start: int, stop: int, first: bool) -> None:
        self.marker = marker_table(start, stop)
        self.first = first
        self._writers: dict[tuple[str, str], Any] = {}

    def write(self, task: StageTask, cache: ActivationCache) -> int:
        """Write ``task``'s captures (``cache``, on CPU) as its sink's chunk; returns the rows written."""
        sink = task.sink
        if sink is None:
            raise ValueError("the task has no store sink")
        key = (sink.store_uri, sink.run_id)
        if key not in self._writers:
            from interplab.store import open_store

            self._writers[key] = open_store(sink.store_uri, create=False).resume_run(sink.run_id)
        batch = task.batch
        chunk = CaptureChunk(
            index=sink.chunk,
            prompt_ids=list(task.prompt_ids),
            token_ids=batch.input_ids.cpu(),
            lengths=batch.lengths.tolist(),
            tokens=[list(t) for t in sink.tokens],
            positions=cache.positions,
            valid=cache.valid,
            acts=dict(cache.items()),
        )
        return write_stage_chunk(self._writers[key], chunk, marker=self.marker, with_prompts=self.first, dtype=sink.dtype)
