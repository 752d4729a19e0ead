"""The pipeline's scheduler: replicas of stage actors, micro-batch chains, and their flights.

    scheduler = Scheduler("smollm2-135m", ParallelConfig(stages=2), [(0, 15), (15, 30)], 30)
    call = scheduler.new_call()
    tasks = scheduler.chain_tasks(call, 0, batch, 0, batch.size, mode="run", capture=sites, ...)
    scheduler.drive([(key, lambda call: tasks)], on_done)      # on_done(key, sides, output)

Each replica is a chain of stage actors (:mod:`interplab.runtime.stage`). A call's batch is split
into row micro-batches; every micro-batch is submitted as a chain of actor calls whose hidden
states travel actor to actor as Ray object references (the driver never fetches them), so while
stage 1 works on micro-batch 0, stage 0 already works on micro-batch 1 (GPipe). Captures,
interventions and gradient sites go only to the stage that owns their layer. A chain that hits a
dead actor is resubmitted once the actor has restarted. Forward passes (:meth:`Scheduler.drive`),
mid-model passes (:mod:`~interplab.runtime.partial`), compiled graphs
(:mod:`~interplab.runtime.compiled`), backward passes (:meth:`Scheduler.backward_call`) and
training (:mod:`~interplab.runtime.training`, :mod:`~interplab.runtime.replicated`) all go through it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from interplab.engine.interventions import Intervention
from interplab.engine.plan import Positions
from interplab.engine.results import LogitsMode, Metric
from interplab.engine.sites import Site, SiteKind
from interplab.engine.tokens import TokenBatch
from interplab.runtime import cluster
from interplab.runtime.compiled import CompiledRuns
from interplab.runtime.config import ParallelConfig
from interplab.runtime.errors import StageError, reraise
from interplab.runtime.microbatch import lent_threads, narrow_interventions, row_ranges, slice_batch, slice_positions, splittable
from interplab.runtime.sink import StoreSink
from interplab.runtime.task import Mode, StageSpan, StageSpec, StageTask

MakeTasks = Callable[[int], Sequence[StageTask | None]]
OnDone = Callable[[Any, list[Any], Any], None]


@dataclass
class Flight:
    """One micro-batch chain in flight on a replica: its tasks (None for stages it skips), the side
    results' and the output's object references once submitted, and how often it was retried."""

    key: Any
    tasks: Sequence[StageTask | None]
    replica: int
    sides: list[Any] = field(default_factory=list)
    out: Any = None
    attempts: int = 0

    @property
    def last_task(self) -> StageTask:
        return next(t for t in reversed(self.tasks) if t is not None)


class Scheduler:
    """Places a model's stage actors (``parallel.replicas`` chains) and runs micro-batch chains on them."""

    def __init__(
        self,
        model: str,
        parallel: ParallelConfig,
        stage_ranges: Sequence[tuple[int, int]],
        n_layers: int,
        *,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        self.parallel = parallel
        self.stage_ranges: list[tuple[int, int]] = [(a, b) for a, b in stage_ranges]
        n = len(self.stage_ranges)
        gpus = parallel.gpus_per_stage
        device = "cuda" if gpus > 0 else "cpu"
        self.specs = [
            StageSpec(i, a, b, n_layers, n, model, dtype, seed, device, max(1, round(parallel.cpus_per_stage)))
            for i, (a, b) in enumerate(self.stage_ranges)
        ]
        cluster.ensure_ray()
        self.replica_handles = [
            cluster.create_replica(r, self.specs, parallel.cpus_per_stage, gpus, timeout_s=parallel.placement_timeout_s)
            for r in range(parallel.replicas)
        ]
        self.graphs = CompiledRuns(self)  # compiled graphs for forward runs (transport "compiled")
        self._calls = itertools.count()
        self._next_replica = itertools.count()
        self._closed = False

    # ------------------------------------------------------------------ layout
    @property
    def n_stages(self) -> int:
        return len(self.stage_ranges)

    @property
    def replicas(self) -> list[cluster.Replica]:
        """The replicas, for ordinary actor calls: a compiled graph holding their actors is torn down
        first (an actor in a compiled graph runs nothing else until the graph is torn down)."""
        self.graphs.release()
        return self.replica_handles

    def stage_of(self, site: Site | str) -> int:
        """Index of the stage that owns ``site`` (embed: first; final/logits: last; else by layer)."""
        site = Site.parse(site)
        if site.kind == SiteKind.EMBED:
            return 0
        if site.layer is None:
            return self.n_stages - 1
        return next(i for i, (a, b) in enumerate(self.stage_ranges) if a <= site.layer < b)

    def new_call(self) -> int:
        """A fresh call id (the stages key kept graphs by call and micro-batch)."""
        return next(self._calls)

    def pick_replica(self) -> int:
        """Replicas in turn, for calls that run whole on one replica."""
        return next(self._next_replica) % len(self.replica_handles)

    def micro_parts(self, batch: TokenBatch, interventions: Sequence[Intervention]) -> list[tuple[int, int]]:
        """Row ranges of a call's micro-batches (one when an intervention cannot be split by rows)."""
        if not splittable(interventions):
            return [(0, batch.size)]
        wanted = self.parallel.micro_batches or 2 * self.n_stages
        return row_ranges(batch.size, wanted)

    def last_stage_needed(
        self, capture: Sequence[Site], interventions: Sequence[Intervention], logits: LogitsMode
    ) -> tuple[int, int | None, bool]:
        """``(last stage to run, layer to stop at in it or None, whether the head runs)``."""
        last = self.n_stages - 1
        if logits != "none" or interventions:
            return last, None, True
        if any(s.layer is None and s.kind != SiteKind.EMBED for s in capture):
            return last, None, True
        top = max((s.layer for s in capture if s.layer is not None), default=-1)
        if top < 0:
            return 0, 0, False
        return self.stage_of(Site(SiteKind.RESID_PRE, top)), top + 1, False

    # ------------------------------------------------------------------ tasks
    def chain_tasks(
        self,
        call: int,
        mb: int,
        batch: TokenBatch,
        lo: int,
        hi: int,
        *,
        mode: Mode,
        capture: Sequence[Site],
        interventions: Sequence[Intervention],
        grad_sites: Sequence[Site] = (),
        positions: Positions = None,
        logits: LogitsMode = "all",
        upto: int | None = None,
        stop: int | None = None,
        with_head: bool = True,
        emit_last: bool = True,
        sink: StoreSink | None = None,
        keep_kv: bool = False,
        prompt_ids: Sequence[int] | None = None,
    ) -> list[StageTask]:
        """The per-stage tasks of one micro-batch (rows ``[lo, hi)`` of ``batch``; ``prompt_ids``
        default to the row numbers), from the first stage to stage ``upto`` (default: the last)."""
        upto = self.n_stages - 1 if upto is None else upto
        sub = slice_batch(batch, lo, hi)
        items = narrow_interventions(interventions, lo, hi, batch.size)
        ids = list(range(lo, hi)) if prompt_ids is None else list(prompt_ids)
        out = []
        for i in range(upto + 1):
            is_last = i == upto
            span = StageSpan(
                stop=stop if is_last else None, with_head=with_head and is_last and i == self.n_stages - 1, logits=logits
            )
            out.append(
                StageTask(
                    call=call,
                    mb=mb,
                    prompt_ids=ids,
                    batch=sub,
                    mode=mode,
                    capture=[s for s in capture if self.stage_of(s) == i],
                    interventions=[x for x in items if self.stage_of(x.site) == i],
                    grad_sites=[s for s in grad_sites if self.stage_of(s) == i],
                    positions=slice_positions(positions, lo, hi),
                    span=span,
                    emit=emit_last or not is_last,
                    sink=sink,
                    keep_kv=keep_kv,
                )
            )
        return out

    def lend_cores(self, tasks: list[StageTask], mb: int, n_mbs: int) -> list[StageTask]:
        """``tasks`` with the threads idle stages lend during fill and drain (``parallel.lend_cores``;
        one replica of CPU stages on one node, see :func:`~interplab.runtime.microbatch.lent_threads`)."""
        replicas = self.replica_handles
        if not (self.parallel.lend_cores and self.specs[0].device == "cpu" and len(replicas) == 1 and replicas[0].one_node):
            return tasks
        threads = lent_threads([spec.threads for spec in self.specs], mb, n_mbs)
        return [task if n == spec.threads else replace(task, threads=n) for task, spec, n in zip(tasks, self.specs, threads)]

    # ------------------------------------------------------------------ execution
    def submit(self, flight: Flight) -> None:
        """Submit a chain: each stage's actor gets its task and the previous stage's output reference."""
        hidden = None
        sides = []
        for task, actor in zip(flight.tasks, self.replicas[flight.replica].actors):
            if task is None:  # the chain starts at a later stage (a pass from a later layer)
                continue
            hidden, side = actor.forward.options(num_returns=2).remote(task, hidden)
            sides.append(side)
        flight.sides, flight.out = sides, hidden

    def _fail(self, flight: Flight, exc: BaseException) -> None:
        """Handle a failed chain: raise a user error, or wait for the restart and resubmit."""
        if not cluster.retryable(exc):
            drain([*flight.sides, flight.out])
            reraise(exc)
        flight.attempts += 1
        if flight.attempts > self.parallel.max_retries:
            spec = self.specs[-1]
            raise StageError(
                spec.index,
                (spec.start, spec.stop),
                list(flight.last_task.prompt_ids),
                type(exc).__name__,
                f"a stage actor died {flight.attempts} times; gave up after {self.parallel.max_retries} retries",
            ) from None
        cluster.wait_alive(self.replicas[flight.replica])
        self.submit(flight)

    def drive(self, items: Iterable[tuple[Any, MakeTasks]], on_done: OnDone, window: int | None = None) -> None:
        """Run micro-batch chains from one queue over all replicas, ``window`` in flight per replica.

        ``items`` yields ``(key, make_tasks)``, ``make_tasks(call)`` the chain's per-stage tasks;
        ``on_done(key, sides, out)`` gets each finished chain's side results (per stage) and final
        output, in completion order."""
        import ray

        window = window or 2 * self.n_stages + 2
        queue = iter(items)
        flights: list[Flight] = []
        load = [0] * len(self.replicas)
        exhausted = False
        while True:
            while not exhausted and min(load) < window:
                try:
                    key, make = next(queue)
                except StopIteration:
                    exhausted = True
                    break
                r = min(range(len(load)), key=lambda i: load[i])
                flight = Flight(key, make(self.new_call()), r)
                self.submit(flight)
                flights.append(flight)
                load[r] += 1
            if not flights:
                return
            ready, _ = ray.wait([f.sides[-1] for f in flights], num_returns=1)
            done = next(f for f in flights if f.sides[-1] == ready[0])
            try:
                sides = ray.get(done.sides)
                out = ray.get(done.out) if done.out is not None and done.last_task.emit else None
            except Exception as exc:  # noqa: BLE001 - classified in _fail
                self._fail(done, exc)
                continue
            flights.remove(done)
            load[done.replica] -= 1
            on_done(done.key, sides, out)

    def backward_call(
        self,
        batch: TokenBatch,
        fn: Metric,
        *,
        mode: Mode,
        capture: Sequence[Site],
        grad_sites: Sequence[Site],
        interventions: Sequence[Intervention],
        positions: Positions,
        logits: LogitsMode,
        replica: int,
    ) -> tuple[list[list[Any]], dict[str, Any], dict[int, list[Any]]]:
        """Forward every micro-batch on ``replica``, evaluate ``fn`` on the last stage, backward through
        every stage: ``(each micro-batch's side results, the last stage's summary, the site gradients
        of the earlier stages by stage)``."""
        import ray

        call = self.new_call()
        parts = self.micro_parts(batch, interventions)
        actors = self.replicas[replica].actors
        flights = []
        for mb, (lo, hi) in enumerate(parts):
            tasks = self.chain_tasks(
                call,
                mb,
                batch,
                lo,
                hi,
                mode=mode,
                capture=capture,
                interventions=interventions,
                grad_sites=grad_sites,
                positions=positions,
                logits=logits,
            )
            flight = Flight(mb, tasks, replica)
            self.submit(flight)
            flights.append(flight)
        mbs = list(range(len(parts)))
        finished = actors[-1].finish.options(num_returns=len(mbs) + 1).remote(call, mbs, batch, fn, mode)
        summary_ref, grad_refs = finished[0], list(finished[1:])
        site_grad_refs: dict[int, list[Any]] = {}
        for stage in range(self.n_stages - 2, -1, -1):
            pairs = [actors[stage].backward.options(num_returns=2).remote(call, mb, grad_refs[mb]) for mb in mbs]
            grad_refs = [p[0] for p in pairs]
            site_grad_refs[stage] = [p[1] for p in pairs]
        try:
            sides = [ray.get(f.sides) for f in flights]
            summary = ray.get(summary_ref)
            lower = {s: ray.get(refs) for s, refs in site_grad_refs.items()}
            ray.get(grad_refs)
        except Exception:
            drain([summary_ref, *grad_refs, *[r for refs in site_grad_refs.values() for r in refs]])
            for actor in actors:
                actor.drop.remote(call)
            raise
        return sides, summary, lower

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the stage actors and release their placement groups."""
        if self._closed:
            return
        self.graphs.release()
        for replica in self.replica_handles:
            cluster.shutdown_replica(replica)
        self._closed = True


def drain(refs: Iterable[Any]) -> None:
    """Fetch and discard results of a failed call, so Ray does not log them as unhandled errors."""
    import ray

    for ref in refs:
        if isinstance(ref, ray.ObjectRef):
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - already reported once
                pass
