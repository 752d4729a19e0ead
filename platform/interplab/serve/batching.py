"""Cross-request batching: concurrent ``run`` requests with the same plan run as one forward pass.

Requests are stacked row-wise, right-padded to the longest (positions count from 0, so a row's
position ``i`` is the same token in the merged batch), and each request's interventions are
re-indexed to its own rows: ``rows`` gain the request's row offset (``None`` becomes its row range)
and ``positions=None`` becomes the request's own ``0..s-1``, so every selection has exactly the shape
it has when the request runs alone, and no intervention can reach another request's rows. Results are
cut back per request: rows, and the position (and key) axes of "every position" captures.

Only requests whose pass is computed the same way are merged (:func:`plan_key`): the same captures,
logits mode and position choice, and the same intervened sites among the kinds that change how a
layer is computed (attention-internal and split-input kinds, ``head_out``, ``resid_mid``). A
request is checked alone first (:func:`check_alone`, the engine's own index and value checks on
meta tensors), so a bad request fails with its own error and never joins a batch; should a merged
pass fail anyway, each of its requests runs alone.

:class:`Batcher` is the queue inside a replica: the first request of a batch waits ``window_ms``
for others (up to ``max_requests``, ``max_rows``, ``max_tokens``); batches are filled by taking
users in turn, and each batch starts with the next user's oldest request, so one user's stream of
requests cannot hold back another user's. A request that is alone (the last batch was a single
request and no other request is being read) does not wait out the window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from interplab.engine.backend import Backend
from interplab.engine.cache import ActivationCache
from interplab.engine.interventions import Intervention, as_long
from interplab.engine.plan import resolve_positions
from interplab.engine.results import LogitsMode, RunResult
from interplab.engine.sites import Site, SiteKind
from interplab.engine.tokens import TokenBatch
from interplab.serve.limits import BatchingConfig
from interplab.serve.sharing import shared_pass

# kinds whose interventions leave the computation of other rows bit for bit alone (an out-of-place
# index_put at a point of the layer loop or on a module's output)
NEUTRAL_KINDS = frozenset(
    {
        SiteKind.EMBED,
        SiteKind.RESID_PRE,
        SiteKind.RESID_POST,
        SiteKind.ATTN_OUT,
        SiteKind.MLP_OUT,
        SiteKind.MLP_POST,
        SiteKind.MLP_IN,
        SiteKind.FINAL,
    }
)


@dataclass
class RunCall:
    """One decoded ``run`` request."""

    batch: TokenBatch
    capture: list[Site]
    interventions: list[Intervention]
    positions: list[int] | torch.Tensor | None
    logits: LogitsMode
    keep_kv: bool = False
    user: str = ""

    def run_alone(self, model: Backend) -> RunResult:
        return model.run(
            self.batch,
            capture=self.capture,
            interventions=self.interventions,
            positions=self.positions,
            logits=self.logits,
            keep_kv=self.keep_kv,
        )


def plan_key(call: RunCall) -> Hashable | None:
    """Calls with equal keys may share a forward pass; None: this call runs alone."""
    if call.keep_kv:
        return None
    if call.positions is None:
        positions: Hashable = "all"
    elif isinstance(call.positions, torch.Tensor):
        positions = ("per-row", int(call.positions.shape[1]))
    else:
        positions = tuple(call.positions)
    path = frozenset((i.site.kind, i.site.layer) for i in call.interventions if i.site.kind not in NEUTRAL_KINDS)
    # a selection whose width is the padded length cannot be narrowed to the call's own: same length only
    width_bound = any(
        i.site.kind == SiteKind.PATTERN or (i.positions is None and i.paired and i.heads is not None) for i in call.interventions
    )
    return (tuple(str(s) for s in call.capture), call.logits, positions, path, call.batch.seq_len if width_bound else None)


def canonical_shape(kind: SiteKind, rows: int, seq_len: int, dims: dict[str, int]) -> tuple[int, ...]:
    """The shape interventions at ``kind`` see (canonical layout ``[b, s, ...]``)."""
    sizes = {"b": rows, "p": seq_len, "s": seq_len, "h": dims["n_heads"], **dims}
    layout = list(kind.layout)
    if kind.heads_first:
        layout[kind.head_axis], layout[kind.position_axis] = layout[kind.position_axis], layout[kind.head_axis]  # type: ignore[index]
    return tuple(sizes[a] for a in layout)


def check_alone(call: RunCall, dims: dict[str, int]) -> None:
    """Raise what running ``call`` alone would raise for its positions and interventions (the
    engine's own checks, run on meta tensors: no memory, no compute)."""
    batch = call.batch
    resolve_positions(call.positions, batch.lengths, batch.seq_len)
    for index, item in enumerate(call.interventions):
        if item.site.kind == SiteKind.LOGITS:
            continue  # its shape depends on the logits mode: left to the pass itself
        meta = torch.empty(canonical_shape(item.site.kind, batch.size, batch.seq_len, dims), device="meta")
        value = item.value.to("meta") if isinstance(item.value, torch.Tensor) else item.value
        try:
            dataclasses.replace(item, value=value).apply(meta, batch.lengths)
        except Exception as exc:
            raise type(exc)(f"interventions[{index}]: {exc}") from None


@dataclass(frozen=True)
class Span:
    offset: int
    rows: int
    seq_len: int


def merge(calls: Sequence[RunCall], pad_id: int) -> tuple[RunCall, list[Span]]:
    """One call running every call's rows (see the module docstring), and where each call's rows are."""
    width = max(c.batch.seq_len for c in calls)
    spans, ids, lengths, interventions, per_row = [], [], [], [], []
    offset = 0
    for call in calls:
        b, s = call.batch.size, call.batch.seq_len
        spans.append(Span(offset, b, s))
        ids.append(torch.nn.functional.pad(call.batch.input_ids.long(), (0, width - s), value=pad_id))
        lengths.append(call.batch.lengths.long())
        interventions += [_shift(item, offset, b, s) for item in call.interventions]
        if isinstance(call.positions, torch.Tensor):
            per_row.append(call.positions)
        offset += b
    lengths_all = torch.cat(lengths)
    mask = (torch.arange(width)[None, :] < lengths_all[:, None]).long()
    texts = [t for c in calls for t in (c.batch.texts or ())]
    batch = TokenBatch(torch.cat(ids), mask, lengths_all, tuple(texts) if len(texts) == offset else None)
    first = calls[0]
    positions = torch.cat(per_row) if per_row else first.positions
    return RunCall(batch, first.capture, interventions, positions, first.logits), spans


def _shift(item: Intervention, offset: int, rows: int, seq_len: int) -> Intervention:
    own = as_long(item.rows)
    shifted = torch.arange(offset, offset + rows) if own is None else own + offset
    if item.positions is not None:
        return dataclasses.replace(item, rows=shifted)
    if item.paired and item.heads is not None:  # merged with equal lengths only (plan_key)
        return dataclasses.replace(item, rows=shifted)
    return dataclasses.replace(item, rows=shifted, positions=torch.arange(seq_len), paired=False)


def split(result: RunResult, calls: Sequence[RunCall], spans: Sequence[Span]) -> list[RunResult]:
    """Each call's own part of a merged result, as if it had run alone."""
    out = []
    all_positions = calls[0].positions is None
    for call, span in zip(calls, spans):
        rows = slice(span.offset, span.offset + span.rows)
        s = span.seq_len
        logits = result.logits
        if logits is not None:
            logits = logits[rows, :s] if logits.ndim == 3 else logits[rows]
        values = {}
        for site, value in result.cache.items():
            index: list[slice] = []
            for axis in site.kind.layout:
                if axis == "b":
                    index.append(rows)
                elif axis == "s" or (axis == "p" and all_positions):
                    index.append(slice(0, s))
                else:
                    index.append(slice(None))
            values[site] = value[tuple(index)]
        cols = slice(0, s) if all_positions else slice(None)
        cache = ActivationCache(values, result.cache.positions[rows, cols], result.cache.valid[rows, cols])
        out.append(RunResult(logits, cache, call.batch))
    return out


def run_together(model: Backend, calls: Sequence[RunCall], pad_id: int) -> list[RunResult | BaseException]:
    """Run ``calls`` (equal :func:`plan_key`) as one pass; if it fails, each alone (its own error)."""
    if len(calls) == 1:
        return [_alone(model, calls[0])]
    merged, spans = merge(calls, pad_id)
    try:
        result = shared_pass(model, merged) or merged.run_alone(model)
    except Exception:  # noqa: BLE001 - each call then gets its own result or its own error
        return [_alone(model, c) for c in calls]
    return list(split(result, calls, spans))


def _alone(model: Backend, call: RunCall) -> RunResult | BaseException:
    try:
        return call.run_alone(model)
    except Exception as exc:  # noqa: BLE001 - handed to the request that caused it
        return exc


# --------------------------------------------------------------------------- the queue
@dataclass
class _Item:
    call: RunCall
    key: Hashable | None
    future: asyncio.Future[Any]
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Counters for ``serve status``: batches run, requests and rows per batch, requests per user."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    sizes: Counter[int] = field(default_factory=Counter)
    per_user: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "rows": self.rows,
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "per_user": dict(self.per_user),
        }


class Batcher:
    """The replica's queue of ``run`` calls (see the module docstring). ``execute(calls)`` runs one
    batch in ``executor`` (one thread: the model is used by one pass at a time)."""

    def __init__(
        self,
        config: BatchingConfig,
        execute: Callable[[list[RunCall]], list[RunResult | BaseException]],
        executor: Executor,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.in_flight = in_flight  # requests the replica holds (being read, queued, run or answered)
        self._last_size = 0  # requests in the last batch (0: none yet)
        self.execute = execute
        self.executor = executor
        self.queues: OrderedDict[str, list[_Item]] = OrderedDict()  # per user, in arrival order
        self.served_at: dict[str, int] = {}  # user -> the turn in which that user last seeded a batch
        self._turn = 0
        self.stats = BatchStats()
        self._wake = asyncio.Event()  # bound to the replica's loop when first awaited
        self._task: asyncio.Task[None] | None = None
        self._free_since = 0.0
        self._last_pass_s = 0.0  # how long the last batch's pass took
        self._expected = 0  # requests queued when the last pass ended, plus those it answered

    @property
    def depth(self) -> int:
        return sum(len(q) for q in self.queues.values())

    async def submit(self, call: RunCall) -> RunResult:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop())
        key = plan_key(call) if self.config.enabled else None
        item = _Item(call, key, loop.create_future())
        self.queues.setdefault(call.user, []).append(item)
        self._wake.set()
        result: RunResult = await item.future
        return result

    async def aclose(self) -> None:
        """Stop the queue's task (the replica is going away)."""
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.depth:
                seed = self._seed()
                while seed.key is not None and not self._alone() and not self._full(seed):
                    timeout = self._deadline(seed) - time.monotonic()
                    if timeout <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                    except asyncio.TimeoutError:
                        break
                    self._wake.clear()
                items = self._take(seed)
                self._last_size = len(items)
                started = time.monotonic()
                await self._run(items)
                self._free_since = time.monotonic()
                self._last_pass_s = self._free_since - started
                self._expected = len(items) + self.depth  # if the answered requests' senders send again

    def _deadline(self, seed: _Item) -> float:
        """When the batch seeded by ``seed`` stops waiting. The window runs from the seed's arrival, or
        from when the model became free: requests answered by the last batch are often sent again at
        once, and join this one. While fewer requests are queued than the last batch held, it may
        wait longer for them (``regroup``: a share of the last pass's duration)."""
        cfg = self.config
        deadline = max(seed.arrived, self._free_since) + cfg.window_ms / 1000
        if self.depth < self._expected:
            regroup = min(cfg.regroup * self._last_pass_s, cfg.regroup_max_ms / 1000)
            deadline = max(deadline, self._free_since + regroup)
        return deadline

    def _alone(self) -> bool:
        """Nothing suggests company: the last batch was one request and every request the replica
        holds is already queued (none is being read). A lone client's requests then skip the window;
        concurrent clients (a batch of several) and a fresh replica keep it."""
        return self.in_flight is not None and self._last_size == 1 and self.in_flight() <= self.depth

    def _seed(self) -> _Item:
        """The oldest request of the user whose turn it is: the waiting user who seeded a batch
        longest ago (never: first), ties by the oldest request. A user whose queue ran empty keeps
        their place in the turns, so sending again at once does not put them first."""
        user = min((u for u, q in self.queues.items() if q), key=self._turn_of)
        return self.queues[user][0]

    def _turn_of(self, user: str) -> tuple[int, float]:
        return self.served_at.get(user, -1), self.queues[user][0].arrived

    def _candidates(self, seed: _Item) -> list[_Item]:
        """Requests that may join ``seed``'s batch, taking users in turn (one each per round)."""
        if seed.key is None:
            return [seed]
        users = sorted((u for u, q in self.queues.items() if q), key=self._turn_of)  # the seed's user first
        queues = [[i for i in self.queues[u] if i.key == seed.key] for u in users]
        out: list[_Item] = []
        while any(queues):
            for q in queues:
                if q:
                    out.append(q.pop(0))
        return out

    def _take(self, seed: _Item) -> list[_Item]:
        cfg = self.config
        chosen: list[_Item] = []
        rows = width = 0
        for item in self._candidates(seed):
            b, s = item.call.batch.size, item.call.batch.seq_len
            fits = len(chosen) < cfg.max_requests and rows + b <= cfg.max_rows and (rows + b) * max(width, s) <= cfg.max_tokens
            if chosen and not fits:
                continue
            chosen.append(item)
            rows, width = rows + b, max(width, s)
        for item in chosen:
            self.queues[item.call.user].remove(item)
        self._turn += 1  # the seed's user goes to the back of the turns
        self.served_at[seed.call.user] = self._turn
        for name in [u for u, q in self.queues.items() if not q]:
            del self.queues[name]
        return chosen

    def _full(self, seed: _Item) -> bool:
        same = [i for q in self.queues.values() for i in q if i.key == seed.key]
        rows = sum(i.call.batch.size for i in same)
        return len(same) >= self.config.max_requests or rows >= self.config.max_rows

    async def _run(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        calls = [i.call for i in items]
        try:
            outcomes = await loop.run_in_executor(self.executor, self.execute, calls)
        except Exception as exc:  # noqa: BLE001 - every request of the batch learns of it
            outcomes = [exc] * len(items)
        stats = self.stats
        stats.batches += 1
        stats.requests += len(items)
        stats.rows += sum(c.batch.size for c in calls)
        stats.sizes[len(items)] += 1
        for item, outcome in zip(items, outcomes):
            stats.per_user[item.call.user] += 1
            if item.future.done():  # the client went away
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
