"""``PipelineModel``: the Ray backend. Same methods as :class:`~interplab.engine.HookedModel`.

    pipe = PipelineModel("smollm2-135m", ParallelConfig(stages=2))
    out = pipe.run(prompts, capture=["resid_pre.20"], positions=[-1])   # as HookedModel.run

Each replica is a chain of stage actors (``interplab.runtime.stage``). A call's batch is tokenised
once and split into row micro-batches; every micro-batch is submitted as a chain of actor calls
whose hidden states travel actor to actor as Ray object references (the driver never fetches them),
so while stage 1 works on micro-batch 0, stage 0 already works on micro-batch 1 (GPipe). Captures,
interventions and gradient sites go only to the stage that owns their layer. A micro-batch whose
chain hits a dead actor is resubmitted once the actor has restarted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from interplab.engine.cache import ActivationCache
from interplab.engine.hooked import GradResult, LogitsMode, Metric, Prompts, RunResult
from interplab.engine.interventions import Intervention
from interplab.engine.plan import KVPrefix, Positions, resolve_positions
from interplab.engine.sites import Site, SiteKind, parse_sites
from interplab.engine.tokens import TokenBatch
from interplab.runtime import cluster
from interplab.runtime.compiled import CompiledRuns
from interplab.runtime.config import ParallelConfig
from interplab.runtime.errors import StageError
from interplab.runtime.microbatch import lent_threads, narrow_interventions, row_ranges, slice_batch, slice_positions, splittable
from interplab.runtime.parameters import PipelineParameters
from interplab.runtime.sink import StoreSink
from interplab.runtime.split import LayerWork, model_bytes, resolve_stages
from interplab.runtime.stage import StageSpec, StageTask


@dataclass
class _Flight:
    """One micro-batch chain in flight on a replica."""

    key: Any
    tasks: list[StageTask]
    replica: int
    sides: list = None
    out: Any = None
    attempts: int = 0


class PipelineModel(PipelineParameters):
    """A model split into stages on Ray actors, with data-parallel replicas. See the module docstring."""

    def __init__(
        self,
        model: str,
        parallel: ParallelConfig,
        *,
        dtype: str = "float32",
        seed: int = 0,
        capacity_bytes: int | None = None,
        layer_work: Callable[[Any], LayerWork | None] | None = None,
    ) -> None:
        from interplab.runtime.skeleton import load_skeleton

        self.parallel = parallel
        self._skeleton = load_skeleton(model, dtype=dtype, seed=seed)
        sk = self._skeleton
        sizes = model_bytes(sk) if parallel.stages == "auto" else None
        work = layer_work(sk) if layer_work is not None else None  # given the meta-device skeleton
        self.stage_ranges: list[tuple[int, int]] = resolve_stages(parallel, sk.n_layers, sizes, capacity_bytes, work)
        n = len(self.stage_ranges)
        gpus = parallel.gpus_per_stage
        device = "cuda" if gpus > 0 else "cpu"
        self._specs = [
            StageSpec(i, a, b, sk.n_layers, n, model, dtype, seed, device, max(1, round(parallel.cpus_per_stage)))
            for i, (a, b) in enumerate(self.stage_ranges)
        ]
        cluster.ensure_ray()
        self._replica_handles = [cluster.create_replica(r, self._specs, parallel.cpus_per_stage, gpus) for r in range(parallel.replicas)]
        self._graphs = CompiledRuns(self)  # compiled graphs for `run` (transport "compiled")
        self._calls = itertools.count()
        self._next_replica = itertools.count()
        self._steps = 0
        self._names: list[list[str]] | None = None
        self._closed = False

    @property
    def _replicas(self) -> list:
        """The replicas, for ordinary actor calls: a compiled graph holding their actors is torn down
        first (an actor in a compiled graph runs nothing else until the graph is torn down)."""
        self._graphs.release()
        return self._replica_handles

    # ------------------------------------------------------------------ the HookedModel surface
    name = property(lambda self: self._skeleton.name)
    weight_hash = property(lambda self: self._skeleton.weight_hash)
    tokenizer = property(lambda self: self._skeleton.tokenizer)
    config = property(lambda self: self._skeleton.config)
    spec = property(lambda self: self._skeleton.spec)
    n_layers = property(lambda self: self._skeleton.n_layers)
    n_heads = property(lambda self: self._skeleton.n_heads)
    n_kv_heads = property(lambda self: self._skeleton.n_kv_heads)
    d_model = property(lambda self: self._skeleton.d_model)
    head_dim = property(lambda self: self._skeleton.head_dim)
    d_mlp = property(lambda self: self._skeleton.d_mlp)
    d_vocab = property(lambda self: self._skeleton.d_vocab)
    has_resid_mid = property(lambda self: self._skeleton.has_resid_mid)

    @property
    def n_stages(self) -> int:
        return len(self.stage_ranges)

    def sites(self, kinds: Iterable[str] | None = None) -> list[Site]:
        return self._skeleton.sites(kinds)

    def validate_site(self, site: Site | str) -> Site:
        return self._skeleton.validate_site(site)

    def tokenize(self, prompts: Prompts) -> TokenBatch:
        return self._skeleton.tokenize(prompts)

    def to_str_tokens(self, text: str) -> list[str]:
        return self._skeleton.to_str_tokens(text)

    def stage_of(self, site: Site | str) -> int:
        """Index of the stage that owns ``site`` (embed: first; final/logits: last; else by layer)."""
        site = Site.parse(site)
        if site.kind == SiteKind.EMBED:
            return 0
        if site.layer is None:
            return self.n_stages - 1
        return next(i for i, (a, b) in enumerate(self.stage_ranges) if a <= site.layer < b)

    def stage_pids(self, replica: int = 0) -> list[int]:
        """Process ids of a replica's stage actors (for monitoring and fault-injection tests)."""
        import ray

        return [pid for pid, _ in ray.get([a.ping.remote() for a in self._replicas[replica].actors])]

    def stage_actor(self, stage: int, replica: int = 0):
        return self._replicas[replica].actors[stage]

    def stage_forward(
        self, index: int, batch: TokenBatch, hidden: torch.Tensor | None, *, capture: Sequence[Site | str] = (),
        interventions: Sequence[Intervention] = (), logits: LogitsMode = "last", replica: int = 0,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Run stage ``index`` alone on ``hidden`` (the previous stage's output; None for the first):
        ``(its output: hidden state, or logits on the last stage; its captures)``.

        For analyses that carry their own state from stage to stage (edge patching sends each stage the
        source differences the earlier stages produced); every site must belong to stage ``index``.
        """
        import ray

        capture, _ = self._validate(capture, interventions)
        wrong = [str(s) for s in [*capture, *(x.site for x in interventions)] if self.stage_of(s) != index]
        if wrong:
            raise ValueError(f"sites {wrong} do not belong to stage {index} (layers {self.stage_ranges[index]})")
        spec = self._specs[index]
        task = StageTask(call=next(self._calls), mb=0, prompt_ids=list(range(batch.size)), batch=batch, mode="run",
                         capture=capture, interventions=list(interventions), logits=logits, with_head=spec.last)
        out, side = self.stage_actor(index, replica).forward.options(num_returns=2).remote(task, hidden)
        try:
            return ray.get(out), ray.get(side)
        except Exception as exc:  # noqa: BLE001 - re-raised as the user's error
            raise cluster.unwrap(exc) from None

    # ------------------------------------------------------------------ planning
    def _micro_parts(self, batch: TokenBatch, interventions: Sequence[Intervention]) -> list[tuple[int, int]]:
        if not splittable(interventions):
            return [(0, batch.size)]
        wanted = self.parallel.micro_batches or 2 * self.n_stages
        return row_ranges(batch.size, wanted)

    def _validate(self, capture, interventions, grad_sites=()) -> tuple[list[Site], list[Site]]:
        capture = [self.validate_site(s) for s in parse_sites(list(capture))] if capture else []
        grad_sites = [self.validate_site(s) for s in parse_sites(list(grad_sites))] if grad_sites else []
        for item in interventions:
            self.validate_site(item.site)
        return capture, grad_sites

    def _last_stage_needed(self, capture: list[Site], interventions, logits: LogitsMode) -> tuple[int, int | None, bool]:
        """``(last stage to run, layer to stop at in it or None, whether the head runs)`` (as HookedModel.run)."""
        last = self.n_stages - 1
        if logits != "none" or interventions:
            return last, None, True
        if any(s.layer is None and s.kind != SiteKind.EMBED for s in capture):
            return last, None, True
        top = max((s.layer for s in capture if s.layer is not None), default=-1)
        if top < 0:
            return 0, 0, False
        stage = self.stage_of(Site(SiteKind.RESID_PRE, top))
        return stage, top + 1, False

    def _tasks(
        self, call: int, mb: int, batch: TokenBatch, lo: int, hi: int, prompt_ids: list[int], *, mode: str,
        capture: list[Site], interventions: Sequence[Intervention], grad_sites: Sequence[Site] = (),
        positions: Positions, logits: LogitsMode, upto: int | None = None, stop: int | None = None,
        with_head: bool = True, emit_last: bool = True, sink: StoreSink | None = None, tokens=None,
        keep_kv: bool = False,
    ) -> list[StageTask]:
        """The per-stage tasks of one micro-batch (rows ``[lo, hi)`` of ``batch``)."""
        upto = self.n_stages - 1 if upto is None else upto
        sub = slice_batch(batch, lo, hi)
        items = narrow_interventions(interventions, lo, hi, batch.size)
        out = []
        for i in range(upto + 1):
            is_last = i == upto
            out.append(StageTask(
                call=call, mb=mb, prompt_ids=prompt_ids, batch=sub, mode=mode,
                capture=[s for s in capture if self.stage_of(s) == i],
                interventions=[x for x in items if self.stage_of(x.site) == i],
                grad_sites=[s for s in grad_sites if self.stage_of(s) == i],
                positions=slice_positions(positions, lo, hi), logits=logits,
                stop=stop if is_last else None, with_head=with_head and is_last and i == self.n_stages - 1,
                emit=emit_last or not is_last, sink=sink, tokens=tokens, keep_kv=keep_kv,
            ))
        return out

    def _lend_cores(self, tasks: list[StageTask], mb: int, n_mbs: int) -> list[StageTask]:
        """``tasks`` with the threads idle stages lend during fill and drain (``parallel.lend_cores``;
        one replica of CPU stages on one node, see :func:`~interplab.runtime.microbatch.lent_threads`)."""
        replicas = self._replica_handles
        if not (self.parallel.lend_cores and self._specs[0].device == "cpu" and len(replicas) == 1 and replicas[0].one_node):
            return tasks
        threads = lent_threads([spec.threads for spec in self._specs], mb, n_mbs)
        return [task if n == spec.threads else replace(task, threads=n) for task, spec, n in zip(tasks, self._specs, threads)]

    # ------------------------------------------------------------------ execution
    def _submit(self, flight: _Flight) -> None:
        hidden = None
        sides = []
        for task, actor in zip(flight.tasks, self._replicas[flight.replica].actors):
            if task is None:  # the chain starts at a later stage (run_stage from a later layer)
                continue
            hidden, side = actor.forward.options(num_returns=2).remote(task, hidden)
            sides.append(side)
        flight.sides, flight.out = sides, hidden

    def _fail(self, flight: _Flight, exc: BaseException) -> None:
        """Handle a failed chain: raise a user error, or restart-wait and resubmit."""
        if not cluster.retryable(exc):
            _drain([*flight.sides, flight.out])
            raise cluster.unwrap(exc) from None
        flight.attempts += 1
        if flight.attempts > self.parallel.max_retries:
            spec = self._specs[-1]
            raise StageError(
                spec.index, (spec.start, spec.stop), next(t for t in flight.tasks if t).prompt_ids, type(exc).__name__,
                f"a stage actor died {flight.attempts} times; gave up after {self.parallel.max_retries} retries",
            ) from None
        cluster.wait_alive(self._replicas[flight.replica])
        self._submit(flight)

    def _drive(self, items: Iterable[tuple[Any, Callable[[int], list[StageTask]]]], on_done: Callable, window: int | None = None) -> None:
        """Run micro-batch chains from one queue over all replicas, ``window`` in flight per replica.

        ``items`` yields ``(key, make_tasks)``; ``on_done(key, sides, out)`` gets each finished chain's
        side results (per stage) and final output, in completion order.
        """
        import ray

        window = window or 2 * self.n_stages + 2
        queue = iter(items)
        flights: list[_Flight] = []
        load = [0] * len(self._replicas)
        exhausted = False
        while True:
            while not exhausted and min(load) < window:
                try:
                    key, make = next(queue)
                except StopIteration:
                    exhausted = True
                    break
                r = min(range(len(load)), key=lambda i: load[i])
                flight = _Flight(key, make(self._calls.__next__()), r)
                self._submit(flight)
                flights.append(flight)
                load[r] += 1
            if not flights:
                return
            ready, _ = ray.wait([f.sides[-1] for f in flights], num_returns=1)
            done = next(f for f in flights if f.sides[-1] == ready[0])
            try:
                sides = ray.get(done.sides)
                out = ray.get(done.out) if done.out is not None and done.tasks[-1].emit else None
            except Exception as exc:  # noqa: BLE001 - classified in _fail
                self._fail(done, exc)
                continue
            flights.remove(done)
            load[done.replica] -= 1
            on_done(done.key, sides, out)

    # ------------------------------------------------------------------ run
    def run(
        self,
        prompts: Prompts,
        *,
        capture: Sequence[Site | str] = (),
        interventions: Sequence[Intervention] = (),
        positions: Positions = None,
        logits: LogitsMode = "all",
        grad: bool = False,
        keep_kv: bool = False,
    ) -> RunResult:
        """As :meth:`HookedModel.run` (``grad=True`` is not available: use a trainer or ``gradients``;
        ``keep_kv`` gathers every stage's keys/values, e.g. as a prefix for :meth:`run_stage`)."""
        if grad:
            raise ValueError("PipelineModel.run(grad=True) is not supported: the graph lives in the stage actors; "
                             "use interplab.runtime.make_trainer(...) for training or gradients(...) for site gradients")
        batch = self.tokenize(prompts)
        capture, _ = self._validate(capture, interventions)
        pos, valid = resolve_positions(positions, batch.lengths, batch.seq_len)
        upto, stop, with_head = self._last_stage_needed(capture, interventions, logits)
        parts = self._micro_parts(batch, interventions)
        results: dict[int, tuple] = {}

        def items():
            for mb, (lo, hi) in enumerate(parts):
                yield mb, lambda call, mb=mb, lo=lo, hi=hi: self._lend_cores(self._tasks(
                    call, mb, batch, lo, hi, list(range(lo, hi)), mode="run", capture=capture,
                    interventions=interventions, positions=positions, logits=logits, upto=upto, stop=stop,
                    with_head=with_head, emit_last=with_head and logits != "none", keep_kv=keep_kv,
                ), mb, len(parts))

        if not (upto == self.n_stages - 1 and not keep_kv and self._graphs.run(items(), results)):
            self._drive(items(), lambda key, sides, out: results.__setitem__(key, (sides, out)), window=len(parts))
        ordered = [results[mb] for mb in range(len(parts))]
        sides = [side for mb_sides, _ in ordered for side in mb_sides]
        kv = None
        if keep_kv:  # each side is (captures, {layer: (k, v)}); micro-batches are rows, in order
            kv = _concat_kv([k for _, k in sides])
            sides = [c for c, _ in sides]
        values = _concat_caches(sides, capture)
        out_logits = torch.cat([o for _, o in ordered], dim=0) if with_head and logits != "none" else None
        return RunResult(out_logits, ActivationCache(values, pos, valid), batch, kv)

    def run_stage(
        self,
        batch: TokenBatch,
        *,
        start: int,
        stop: int,
        hidden: torch.Tensor | None = None,
        with_head: bool = False,
        capture: Sequence[Site | str] = (),
        interventions: Sequence[Intervention] = (),
        positions: Positions = None,
        logits: LogitsMode = "all",
        grad: bool = False,
        prefix: KVPrefix | None = None,
        joins: Mapping[int, torch.Tensor] | None = None,
        vocab: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """As :meth:`HookedModel.run_stage` over the whole pipeline, for forward passes: layers
        ``[start, stop)`` from ``hidden`` and/or ``joins``, with a cached ``prefix`` and ``vocab``.

        Each micro-batch's chain starts at the stage holding its rows' first layer; rows joining
        later travel with the tasks of the stage that owns their layer. Captures and gradients are
        not taken here (use :meth:`run` / :meth:`gradients`)."""
        if capture or grad or positions is not None:
            raise ValueError("PipelineModel.run_stage runs forward passes only: use run(capture=...) or gradients(...)")
        out: dict[int, torch.Tensor] = {}
        request = dict(batch=batch, start=start, stop=stop, hidden=hidden, with_head=with_head, interventions=interventions,
                       logits=logits, prefix=prefix, joins=joins, vocab=vocab)
        self.run_stages([(0, request)], out.__setitem__)
        pos, valid = resolve_positions(None, batch.lengths, batch.seq_len)
        return out[0], ActivationCache({}, pos, valid)

    def run_stages(self, requests: Iterable[tuple[Any, dict]], on_done: Callable[[Any, torch.Tensor], None]) -> None:
        """Many forward :meth:`run_stage` calls, given as ``(key, keyword arguments)`` and consumed
        lazily, streamed through the pipeline together so the stages work on different calls at
        once (one call alone leaves a stage idle while the other works on its last micro-batches);
        ``on_done(key, output)`` runs as each call finishes, in completion order."""
        from interplab.runtime.partial import run_partial_calls

        run_partial_calls(self, requests, on_done)

    # ------------------------------------------------------------------ capture to the store
    def capture_to_store(
        self,
        prompts: Iterable[str],
        sites: Sequence[Site | str],
        writer,
        *,
        batch_size: int = 16,
        positions: Positions = None,
        dtype: str = "float16",
        skip_chunks: Iterable[int] = (),
        on_chunk: Callable[[int], None] | None = None,
    ) -> int:
        """Capture ``sites`` for every prompt; each stage writes its own sites to ``writer``'s run.

        Chunk ``i`` holds prompts ``[i * batch_size, (i + 1) * batch_size)`` (ids count from 0), as
        :meth:`HookedModel.capture_stream` numbers them; ``skip_chunks`` (e.g. from a resumed run)
        are not recomputed. ``on_chunk(i)`` is called on the driver as chunk ``i`` completes. Returns
        the number of chunks written. The caller commits the run.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        capture, _ = self._validate(sites, ())
        upto, stop, with_head = self._last_stage_needed(capture, (), "none")
        store_uri = writer.store.uri  # the stages open their own writers on the same run
        skip = set(skip_chunks)
        written = 0

        def items() -> Iterator:
            it = iter(prompts)
            for index in itertools.count():
                texts = list(itertools.islice(it, batch_size))
                if not texts:
                    return
                if index in skip:
                    continue
                batch = self.tokenize(texts)
                first = index * batch_size
                ids = list(range(first, first + len(texts)))
                tokens = [[self.tokenizer.decode([int(t)]) for t in batch.input_ids[i, : int(batch.lengths[i])]] for i in range(batch.size)]
                sink = StoreSink(store_uri, writer.run_id, index, dtype)
                yield index, lambda call, batch=batch, ids=ids, tokens=tokens, sink=sink: self._tasks(
                    call, 0, batch, 0, batch.size, ids, mode="run", capture=capture, interventions=(),
                    positions=positions, logits="none", upto=upto, stop=stop, with_head=with_head,
                    emit_last=False, sink=sink, tokens=tokens,
                )

        def done(index, sides, out):
            nonlocal written
            written += 1
            if on_chunk is not None:
                on_chunk(index)

        self._drive(items(), done)
        return written

    # ------------------------------------------------------------------ gradients and training
    def _pick_replica(self) -> int:
        return next(self._next_replica) % len(self._replicas)

    def _backward_call(self, batch, fn, *, mode, capture, grad_sites, interventions, positions, logits, replica):
        """Forward all micro-batches, evaluate ``fn`` on the last stage, backward through every stage."""
        import ray

        call = next(self._calls)
        parts = self._micro_parts(batch, interventions)
        actors = self._replicas[replica].actors
        flights = []
        for mb, (lo, hi) in enumerate(parts):
            tasks = self._tasks(call, mb, batch, lo, hi, list(range(lo, hi)), mode=mode, capture=capture,
                                interventions=interventions, grad_sites=grad_sites, positions=positions, logits=logits)
            flight = _Flight(mb, tasks, replica)
            self._submit(flight)
            flights.append(flight)
        mbs = list(range(len(parts)))
        finished = actors[-1].finish.options(num_returns=len(mbs) + 1).remote(call, mbs, batch, fn, mode)
        summary, grad_refs = finished[0], list(finished[1:])
        site_grads = {self.n_stages - 1: summary}
        for stage in range(self.n_stages - 2, -1, -1):
            pairs = [actors[stage].backward.options(num_returns=2).remote(call, mb, grad_refs[mb]) for mb in mbs]
            grad_refs = [p[0] for p in pairs]
            site_grads[stage] = [p[1] for p in pairs]
        try:
            sides = [ray.get(f.sides) for f in flights]
            summary = ray.get(summary)
            lower = {s: ray.get(refs) for s, refs in site_grads.items() if s != self.n_stages - 1}
            ray.get(grad_refs)
        except Exception as exc:  # noqa: BLE001
            _drain([summary, *grad_refs, *[r for refs in site_grads.values() if isinstance(refs, list) for r in refs]])
            for actor in actors:
                actor.drop.remote(call)
            raise exc
        return sides, summary, lower

    def gradients(
        self,
        prompts: Prompts,
        metric: Metric,
        sites: Sequence[Site | str],
        *,
        interventions: Sequence[Intervention] = (),
        capture: Sequence[Site | str] = (),
        positions: Positions = None,
        logits: LogitsMode = "all",
    ) -> GradResult:
        """As :meth:`HookedModel.gradients`; ``metric`` (any picklable callable) runs on the last stage."""
        batch = self.tokenize(prompts)
        capture, grad_sites = self._validate(capture, interventions, sites)
        pos, valid = resolve_positions(positions, batch.lengths, batch.seq_len)
        replica = self._pick_replica()
        for attempt in itertools.count():
            try:
                sides, summary, lower = self._backward_call(
                    batch, metric, mode="grad", capture=capture, grad_sites=grad_sites,
                    interventions=interventions, positions=positions, logits=logits, replica=replica,
                )
                break
            except Exception as exc:  # noqa: BLE001
                if not cluster.retryable(exc) or attempt >= self.parallel.max_retries:
                    raise cluster.unwrap(exc) from None
                cluster.wait_alive(self._replicas[replica])
        per_stage = [lower.get(s) for s in range(self.n_stages - 1)] + [summary["site_grads"]]
        grads = _concat_caches([c for stage in per_stage for c in stage], grad_sites)
        cache = _concat_caches([c for mb_sides in sides for c in mb_sides], list(capture) + grad_sites)
        return GradResult(summary["value"], ActivationCache(grads, pos, valid), ActivationCache(cache, pos, valid), summary["logits"])

    def _train_step(self, prompts: Prompts, loss_fn: Metric, *, interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        """One optimizer step over ``prompts`` (used by :class:`~interplab.runtime.training.PipelineTrainer`)."""
        import ray

        from interplab.runtime.replicated import replicated_backward

        batch = self.tokenize(prompts)
        self._validate((), interventions)
        replicas = self._replicas
        expected = self._steps
        for replica in replicas:
            if any(steps != expected for _, steps in cluster.wait_alive(replica)):
                raise StageError(0, self.stage_ranges[0], [], "TrainingStateLost",
                                 "a stage actor restarted and lost its weights and optimizer state; restart training from a checkpoint")
        try:
            if len(replicas) == 1:  # the loss is evaluated on the last stage
                _, summary, _ = self._backward_call(batch, loss_fn, mode="train", capture=[], grad_sites=[],
                                                    interventions=interventions, positions=None, logits="all", replica=0)
                value = summary["value"]
            else:  # data parallel: the driver evaluates the loss on every replica's logits
                value = replicated_backward(self, batch, loss_fn, interventions)
            if self.n_stages > 1 and getattr(self.config, "tie_word_embeddings", False):
                for replica in replicas:
                    first, last = replica.actors[0].tied_grad.remote(), replica.actors[-1].tied_grad.remote()
                    ray.get([replica.actors[0].add_tied_grad.remote(last), replica.actors[-1].add_tied_grad.remote(first)])
            ray.get([a.step.remote(-1) for replica in replicas for a in replica.actors])
        except Exception as exc:  # noqa: BLE001
            raise cluster.unwrap(exc) from None
        self._steps += 1
        return value

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the stage actors and release their placement groups."""
        if self._closed:
            return
        self._graphs.release()
        for replica in self._replica_handles:
            cluster.shutdown_replica(replica)
        self._closed = True

    def __enter__(self) -> PipelineModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PipelineModel({self.name!r}, stages={self.stage_ranges}, replicas={len(self._replica_handles)})"


def _drain(refs) -> None:
    """Fetch and discard results of a failed call, so Ray does not log them as unhandled errors."""
    import ray

    for ref in refs:
        if isinstance(ref, ray.ObjectRef):
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - already reported once
                pass


def _concat_kv(parts: Sequence[dict[int, tuple[torch.Tensor, torch.Tensor]]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> (keys, values) with every micro-batch's rows concatenated (parts in micro-batch order)."""
    pieces: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for part in parts:
        for layer, kv in part.items():
            pieces.setdefault(layer, []).append(kv)
    return {layer: (torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs])) for layer, kvs in sorted(pieces.items())}


def _concat_caches(parts: Sequence[ActivationCache], order: Sequence[Site]) -> dict[Site, torch.Tensor]:
    """Site -> rows of every micro-batch concatenated (parts of one site arrive in micro-batch order)."""
    pieces: dict[Site, list[torch.Tensor]] = {}
    for part in parts:
        if part is None:
            continue
        for site, value in part.items():
            pieces.setdefault(site, []).append(value)
    return {site: torch.cat(pieces[site], dim=0) for site in order if site in pieces}
