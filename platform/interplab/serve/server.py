"""The request path of one replica, independent of the HTTP framework: token, body, checks, queue,
model thread, answer. The Ray Serve deployment (:mod:`interplab.serve.deployment`) hands each HTTP
request to :meth:`Server.answer`; tests can call it in-process.

Every failure becomes an answer (status and JSON error, :mod:`interplab.serve.errors`) and the
server keeps serving: 401 (token), 400 (a field, naming it), 413 (a limit, naming it), 429 (a user's
requests in flight), 500 (a failure of the service itself, logged with its traceback).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from interplab.engine.backend import Backend
from interplab.engine.results import RunResult
from interplab.serve.auth import TokenAuth
from interplab.serve.batching import Batcher, RunCall, run_together
from interplab.serve.errors import LimitError, error_body, status_for
from interplab.serve.limits import BatchingConfig, ServeLimits
from interplab.serve.service import Call, ModelService
from interplab.serve.wire import CONTENT_TYPE, ROWS, VIEW, decode_frame, make_whole

log = logging.getLogger("interplab.serve")
RATE_WINDOW_S = 60.0
# requests and answers smaller than this are read and written in the replica's event loop
INLINE_BYTES = 1 << 16
PARALLEL_ELEMENTS = 1 << 15  # torch copies at least this many elements with its thread team (its grain size)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str


class Server:
    """One replica's model service (see the module docstring)."""

    def __init__(
        self,
        backend: Backend | Callable[[], Backend],
        *,
        name: str,
        auth: TokenAuth,
        limits: ServeLimits,
        batching: BatchingConfig,
        dtype: str = "float32",
        source: str = "",
        parallel: dict[str, Any] | None = None,
    ) -> None:
        self.auth = auth
        self.limits = limits
        self.batching = batching
        # the model's one thread; ``backend`` may be a factory, called there: torch's CPU kernels then
        # run in one OpenMP thread team (a second thread running them, even once, slowed every
        # forward ~1.5x on a 2-core CPU: docs/serving.md)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="interplab-model")
        built = cast(Backend, backend) if hasattr(backend, "run") else self.executor.submit(backend).result()
        self.service = ModelService(built, name=name, limits=limits, dtype=dtype, source=source, parallel=parallel)
        self.in_flight: Counter[str] = Counter()
        self.batcher = Batcher(batching, self._run_batch, self.executor, lambda: sum(self.in_flight.values()))
        self.requests: Counter[str] = Counter()  # answered, by operation
        self.errors: Counter[int] = Counter()  # by status
        self.recent: deque[float] = deque()
        self.started = time.time()
        self.model_s = 0.0  # time in the model's thread (forward passes), for the overhead benchmark

    def _run_batch(self, calls: list[RunCall]) -> list[Any]:
        started = time.perf_counter()
        try:
            return run_together(self.service.backend, calls, self.service.pad_id)
        finally:
            self.model_s += time.perf_counter() - started

    def _execute(self, call: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.service.execute(call)
        finally:
            self.model_s += time.perf_counter() - started

    async def answer(self, op: str, authorization: str | None, body: bytes, declared_length: int | None = None) -> Answer:
        try:
            user = self.auth.user(authorization)
        except Exception as exc:  # noqa: BLE001 - answered as 401
            return self._error(exc)
        if self.in_flight[user] >= self.limits.max_user_in_flight:
            return self._error(
                LimitError(
                    "max_user_in_flight",
                    self.limits.max_user_in_flight,
                    self.in_flight[user] + 1,
                    f"user {user!r}'s requests in flight",
                )
            )
        self.in_flight[user] += 1
        try:
            return await self._answer(op, user, body, declared_length)
        except Exception as exc:  # noqa: BLE001 - every failure is an answer; the replica keeps serving
            return self._error(exc)
        finally:
            self.in_flight[user] -= 1

    async def _answer(self, op: str, user: str, body: bytes, declared_length: int | None) -> Answer:
        limits = self.limits
        size = max(len(body), declared_length or 0)
        if size > limits.max_request_bytes:
            raise LimitError("max_request_bytes", limits.max_request_bytes, size, "the request body's bytes")
        # a small request is read at once (a thread's hand-offs would cost more than the work); a big
        # one's tensors are copied and checked with parallel torch kernels: in the model's thread (one
        # thread team). Tensors sent as distinct rows or as views are big once made whole.
        small = size < INLINE_BYTES
        loop = asyncio.get_running_loop()
        decode = functools.partial(
            decode_frame, body, max_json_bytes=limits.max_json_bytes, max_tensor_bytes=limits.max_tensor_bytes, whole=False
        )
        header, sent = decode() if small else await loop.run_in_executor(self.executor, decode)
        small = small and not any(name.endswith((ROWS, VIEW)) for name in sent)

        def parse() -> Call | RunCall:
            return self.service.parse(op, header, make_whole(sent, limits.max_tensor_bytes), user)

        call = parse() if small else await loop.run_in_executor(self.executor, parse)
        if isinstance(call, RunCall):
            result = await self.batcher.submit(call)
            prompts = header.get("prompts")
            texts_sent = isinstance(prompts, dict) and "input_ids" not in prompts
            if _elements(result) < PARALLEL_ELEMENTS:
                out, frame = self.service.encode_run(call, result, texts_sent)
            else:  # copying it runs a parallel torch kernel: in the model's thread (one thread team)
                out, frame = await loop.run_in_executor(self.executor, self.service.encode_run, call, result, texts_sent)
        else:
            out, frame = await loop.run_in_executor(self.executor, self._execute, call)
        data = frame.encode(out) if frame.nbytes < INLINE_BYTES else await asyncio.to_thread(frame.encode, out)
        self.requests[op] += 1
        self._tick()
        return Answer(200, data, CONTENT_TYPE)

    def _error(self, exc: BaseException) -> Answer:
        status = status_for(exc)
        self.errors[status] += 1
        if status >= 500:
            log.error("interplab serve: request failed", exc_info=exc)
        return Answer(status, json.dumps(error_body(exc)).encode(), "application/json")

    def _tick(self) -> None:
        self.recent.append(time.monotonic())
        self._trim()

    def _trim(self) -> None:
        start = time.monotonic() - RATE_WINDOW_S
        while self.recent and self.recent[0] < start:
            self.recent.popleft()

    def counters(self) -> dict[str, Any]:
        """The cheap part of :meth:`stats` (no model info, no process or stage calls): what the replica
        exports after every answer (:mod:`interplab.serve.export`)."""
        return {"requests": dict(self.requests), "queue_depth": self.batcher.depth, "batching": self.batcher.stats.to_json()}

    def stats(self) -> dict[str, Any]:
        """Counters for ``interplab serve status``."""
        self._trim()
        info = self.service.info()
        uptime = time.time() - self.started
        return {
            "model": info["model"],
            "weight_hash": info["weight_hash"],
            "stage_ranges": info["stage_ranges"],
            "uptime_s": round(uptime, 1),
            "requests": dict(self.requests),
            "errors": {str(k): v for k, v in self.errors.items()},
            "requests_per_s": round(len(self.recent) / min(RATE_WINDOW_S, max(uptime, 1e-9)), 3),
            "queue_depth": self.batcher.depth,
            "model_s": round(self.model_s, 6),
            "in_flight": {u: n for u, n in self.in_flight.items() if n},
            "batching": {**self.batching.model_dump(), **self.batcher.stats.to_json()},
            "process": _process(),
            "stage_pids": self._stage_pids(),
        }

    def _stage_pids(self) -> list[int]:
        """The process of each stage: the stage actors of a pipeline, else this replica's own."""
        import os

        pids = getattr(self.service.backend, "stage_pids", None)  # a pipeline's monitoring call
        return list(pids()) if callable(pids) else [os.getpid()]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.service.backend.close()


def _elements(result: RunResult) -> int:
    """Elements of a ``run`` answer's tensors (logits and captures)."""
    logits = result.logits.numel() if result.logits is not None else 0
    return logits + sum(int(value.numel()) for value in result.cache.values())


def _process() -> dict[str, Any]:
    """The replica process: pid, resident memory (the weights are in it once), torch threads."""
    import os

    import psutil
    import torch

    return {
        "pid": os.getpid(),
        "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        "threads": torch.get_num_threads(),
    }
