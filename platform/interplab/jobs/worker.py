"""The Ray actor that runs chunks: holds one model, writes through one :class:`RunWriter`.

Plain class (wrapped with ``ray.remote`` by the driver), heavy imports inside methods, every method
written out. Failures in user code come back as a :class:`ChunkOutcome` with the exception's type,
message and traceback, so the driver can say which chunk failed without a wall of Ray internals.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any

JOB_CHUNKS_TABLE = "job_chunks"  # chunk-done markers of the job system (no data files)


@dataclass(frozen=True)
class ChunkOutcome:
    chunk: str
    ok: bool
    seconds: float = 0.0
    error_type: str = ""
    error: str = ""
    traceback: str = ""


def _failure(chunk: str, exc: BaseException, started: float) -> ChunkOutcome:
    return ChunkOutcome(chunk, False, time.perf_counter() - started, type(exc).__name__, str(exc), traceback.format_exc())


class ChunkWorker:
    """One model replica. ``load`` → ``attach(run)`` → ``run_chunk`` … → ``finalize``."""

    def __init__(self, spec_record: dict[str, Any], device: str):
        self._record = spec_record
        self._device = device
        self._spec: Any = None  # set by load
        self._kind: Any = None
        self._model: Any = None
        self._writer: Any = None  # set by attach

    def load(self) -> tuple[ChunkOutcome, dict[str, str]]:
        """Build the model; returns the outcome and ``{name, weight_hash, device, host}``."""
        started = time.perf_counter()
        try:
            import torch

            from interplab.jobs.model import build_model
            from interplab.jobs.registry import get_kind, parse_spec

            self._spec = parse_spec(self._record)
            self._kind = get_kind(self._spec.kind)
            torch.manual_seed(self._spec.seed)
            self._model = build_model(self._spec, self._device)
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            return _failure("load", exc, started), {}
        import socket

        info = {
            "name": self._model.name,
            "weight_hash": self._model.weight_hash,
            "device": self._device,
            "host": socket.gethostname(),
        }
        return ChunkOutcome("load", True, time.perf_counter() - started), info

    def attach(self, store_uri: str, run_id: str) -> ChunkOutcome:
        started = time.perf_counter()
        try:
            from interplab.store import open_store
            from interplab.store.writer import RunWriter

            self._writer = RunWriter(open_store(store_uri, create=False), run_id)
        except Exception as exc:  # noqa: BLE001
            return _failure("attach", exc, started)
        return ChunkOutcome("attach", True)

    def run_chunk(self, chunk_id: str) -> ChunkOutcome:
        started = time.perf_counter()
        try:
            self._kind.runner.run_chunk(self._spec, self._model, chunk_id, self._writer)
            self._writer.finish_chunk(JOB_CHUNKS_TABLE, chunk_id, [])
        except Exception as exc:  # noqa: BLE001
            return _failure(chunk_id, exc, started)
        return ChunkOutcome(chunk_id, True, time.perf_counter() - started)

    def finalize(self) -> tuple[ChunkOutcome, Any]:
        started = time.perf_counter()
        try:
            summary = self._kind.runner.finalize(self._spec, self._model, self._writer)
        except Exception as exc:  # noqa: BLE001
            return _failure("finalize", exc, started), None
        return ChunkOutcome("finalize", True, time.perf_counter() - started), summary
