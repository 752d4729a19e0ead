"""Ray Compiled Graphs for a pipeline's ``run`` calls (``parallel.transport: compiled``).

One graph per replica: stage ``i`` reads its task from the graph's input ``i`` and stage ``i - 1``'s
output; the graph returns every stage's side result (captures) and the last stage's output. It is
compiled on first use and reused. Between GPU stages the hidden state stays on the device and goes
by NCCL; on CPU the channels are shared memory. A compiled graph takes its actors over for its
lifetime, so the :class:`~interplab.runtime.scheduler.Scheduler` tears it down (:meth:`CompiledRuns.release`)
before any other use of the actors. See ``docs/scaling.md`` (*Transports*).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from interplab.runtime.errors import reraise, unwrap

if TYPE_CHECKING:
    from interplab.runtime.scheduler import MakeTasks, Scheduler


class CompiledRuns:
    """The compiled graphs of one pipeline, by replica."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.graphs: dict[int, Any] = {}

    @property
    def enabled(self) -> bool:
        parallel = self.scheduler.parallel
        return parallel.transport == "compiled" or (
            parallel.transport == "auto" and parallel.gpus_per_stage > 0 and self.scheduler.n_stages > 1
        )

    @property
    def capacity(self) -> int:
        return 2 * self.scheduler.n_stages + 2  # micro-batches in flight per replica, as the object-reference path

    def graph(self, replica: int) -> Any:
        if replica not in self.graphs:
            from ray.dag import InputNode, MultiOutputNode

            actors = self.scheduler.replica_handles[replica].actors
            on_gpu = self.scheduler.parallel.gpus_per_stage > 0
            with InputNode() as inp:
                hidden, sides = None, []
                for i, actor in enumerate(actors):
                    hidden, side = actor.forward.options(num_returns=2).bind(inp[i], hidden)
                    if on_gpu and i < len(actors) - 1:
                        hidden = hidden.with_tensor_transport("nccl")
                    sides.append(side)
                if hidden is None:
                    raise RuntimeError("a replica without stage actors cannot be compiled")
                dag = MultiOutputNode([*sides, hidden])
            self.graphs[replica] = dag.experimental_compile(_max_inflight_executions=self.capacity)
        return self.graphs[replica]

    def release(self) -> None:
        graphs, self.graphs = self.graphs, {}
        for graph in graphs.values():
            try:
                graph.teardown()
            except Exception:  # noqa: BLE001 - a graph whose actor died may fail to tear down; it is gone either way
                pass

    def run(self, items: Iterable[tuple[Any, MakeTasks]], results: dict[Any, tuple[list[Any], Any]]) -> bool:
        """Run ``items`` (``(key, make_tasks)`` as :meth:`Scheduler.drive` takes them) through the
        graphs, micro-batches round-robin over the replicas, at most :attr:`capacity` in flight per
        replica; store ``results[key] = (sides, output)``. Returns False (nothing stored) when the
        transport is not compiled or a graph failed for a reason other than the work itself (a dead
        actor, a broken channel): the caller then runs the call with object references, which retry."""
        if not self.enabled:
            return False
        import ray

        scheduler = self.scheduler
        on_gpu = scheduler.parallel.gpus_per_stage > 0
        n = len(scheduler.replica_handles)
        in_flight: list[tuple[Any, Any]] = []
        got: dict = {}
        try:
            for i, (key, make) in enumerate(items):
                made = make(scheduler.new_call())
                tasks = [replace(t, keep_on_device=on_gpu) if t is not None else None for t in made[:-1]] + [made[-1]]
                if len(in_flight) >= self.capacity * n:
                    done_key, ref = in_flight.pop(0)
                    got[done_key] = ray.get(ref)
                in_flight.append((key, self.graph(i % n).execute(*tasks)))
            for key, ref in in_flight:
                got[key] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - sorted below
            self.release()
            error = unwrap(exc)
            if error is not exc:  # the work failed (raised inside a stage), not the machinery: the user's error
                reraise(exc)
            return False
        for key, values in got.items():
            results[key] = (list(values[:-1]), values[-1])
        return True
