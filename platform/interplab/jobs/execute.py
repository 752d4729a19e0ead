"""The job driver: start (or join) Ray, run the missing chunks on worker actors, commit.

::

    job, uri = prepare(raw, "spec.yaml")          # validation; nothing written yet
    result = run_job(job, uri)                    # embedded Ray unless $RAY_ADDRESS is set

The run is created only once the workers hold their model, so a job that cannot start leaves
nothing in the store. Each finished chunk is recorded (``chunks/<run>/job_chunks``); a failed
attempt is retried ``spec.retries`` times on fresh workers, recomputing only the missing chunks, and
``run_job(job, uri, run_id=R, resume=True)`` continues a killed or failed run the same way. Any
exit other than a commit (error, Ctrl-C, SIGTERM from ``interplab jobs stop``) marks the run failed,
so it is never half-visible.

Signals: while a job runs, SIGINT and SIGTERM both interrupt it (:class:`_Interrupts`), whatever the
process inherited — a job started in the background of a script inherits SIGINT *ignored*, and
``ray.init`` replaces the SIGTERM handler — and a worker pool, a model load or a placement that
waits longer than a few seconds says what it waits for.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from interplab.jobs.errors import JobError, JobInterrupted
from interplab.jobs.kinds import EXTRA_KINDS_ENV
from interplab.jobs.prepare import PreparedJob, chunk_key
from interplab.jobs.registry import JobSummary
from interplab.jobs.worker import JOB_CHUNKS_TABLE, ChunkOutcome, ChunkWorker

log = logging.getLogger(__name__)
Echo = Callable[[str], None]
_FORWARDED_ENV = (EXTRA_KINDS_ENV, "INTERPLAB_CACHE", "HF_HUB_OFFLINE", "PYTHONPATH")


@dataclass(frozen=True)
class JobResult:
    run_id: str
    store: str
    summary: JobSummary
    n_chunks: int
    n_computed: int
    attempts: int
    seconds: float
    already_committed: bool = False
    reused: str | None = None  # a committed run with the job's content key, reported instead of running


@contextmanager
def ray_session(cpus_needed: float = 1.0) -> Iterator[str]:
    """Join ``$RAY_ADDRESS`` (a submitted job, or a cluster you point at) or start an embedded local
    Ray, and disconnect / shut it down on the way out, whatever happens. Yields a description."""
    import ray

    if ray.is_initialized():
        yield "existing Ray session"
        return
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    address = os.environ.get("RAY_ADDRESS") or ""
    forwarded = _FORWARDED_ENV if not address else tuple(k for k in _FORWARDED_ENV if k != "PYTHONPATH")
    env = {k: os.environ[k] for k in forwarded if os.environ.get(k)}
    options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if env and RAY_JOB_CONFIG_JSON_ENV_VAR not in os.environ:  # a submitted job already has its runtime_env
        options["runtime_env"] = {"env_vars": env}
    try:
        if address:
            ray.init(address=address, **options)
            where = f"Ray cluster at {address}"
        else:
            cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, **options)
            where = "embedded local Ray"
        yield where
    finally:  # also when ray.init itself was interrupted half-way
        ray.shutdown()


class _Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM (``interplab jobs stop``, Kubernetes) interrupt the job.

    Installed for the whole run and again right after ``ray.init`` (which puts in its own SIGTERM
    handler, ``sys.exit``, under which Ray's C++ handler aborted the process: exit -6, not 130).
    SIGINT is installed explicitly because a process started in the background by a non-interactive
    shell (``cmd &`` in a script, some CI runners) inherits SIGINT ignored and Python keeps it so:
    a Ctrl-C or ``kill -INT`` was then lost and the job ran on to its commit.

    The handler raises ``KeyboardInterrupt``, the one exception Ray lets out of a blocking
    ``ray.get``/``ray.wait`` (another one raised by a handler waits until the call returns), and
    notes the signal: :meth:`check` (called by the driver's loops) raises again should the first one
    be swallowed on its way. After :meth:`disarm` (committed, or cleaning up) a signal is only noted.
    """

    _REASONS = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "stopped (SIGTERM)"}

    def __init__(self) -> None:
        self.reason: str | None = None
        self._armed = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {sig: signal.getsignal(sig) for sig in self._REASONS}
            self.install()
        return self

    def install(self) -> None:
        for sig in self._previous:
            signal.signal(sig, self._handle)

    def disarm(self) -> None:
        self._armed = False

    def check(self) -> None:
        if self.reason is not None and self._armed:
            raise KeyboardInterrupt(self.reason)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002
        first = self.reason is None
        if first:
            self.reason = self._REASONS.get(signal.Signals(signum), f"signal {signum}")
        if first and self._armed:
            raise KeyboardInterrupt(self.reason)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _raise_failure(outcome: ChunkOutcome, what: str) -> None:
    raise JobError(
        f"{what} failed: {outcome.error_type}: {outcome.error}", chunk=outcome.chunk, remote_traceback=outcome.traceback
    )


class _Workers:
    """The worker actors of one attempt."""

    def __init__(self, job: PreparedJob, echo: Echo, check: Callable[[], None]):
        import ray

        from interplab.jobs.model import uses_pipeline

        spec = job.spec
        gpus = spec.resources.gpus(ray.cluster_resources().get("GPU", 0.0))
        if uses_pipeline(spec):
            gpus = 0.0  # the stage actors hold the GPUs (parallel.gpus_per_stage); this one coordinates
        device = spec.device if spec.device != "auto" else ("cuda" if gpus > 0 else "cpu")
        wanted = {"CPU": spec.resources.num_cpus, "GPU": gpus}
        _check_workers_fit(wanted, spec.workers)
        actor = ray.remote(ChunkWorker).options(num_cpus=spec.resources.num_cpus, num_gpus=gpus, max_restarts=0)
        self.actors: list[Any] = [actor.remote(job.record, device) for _ in range(spec.workers)]
        self.device = device
        echo(f"starting {spec.workers} worker(s) ({spec.resources.num_cpus:g} CPU, {gpus:g} GPU, {device}) with {spec.model}")
        try:
            loaded = _wait(
                [a.load.remote() for a in self.actors], "loading the model", check, _Waiting(echo, self.actors, wanted)
            )
            for outcome, _ in loaded:
                if not outcome.ok:
                    _raise_failure(outcome, "loading the model")
        except BaseException:
            self.kill()  # the caller never gets this object to kill
            raise
        self.info = loaded[0][1]

    def attach(self, store_uri: str, run_id: str) -> None:
        for outcome in _get([a.attach.remote(store_uri, run_id) for a in self.actors], "opening the store"):
            if not outcome.ok:
                _raise_failure(outcome, "opening the store")

    def run(self, chunk_ids: list[str], progress, check: Callable[[], None]) -> int:
        """Run ``chunk_ids`` (one in flight per worker, dynamically balanced); returns how many ran.
        ``check`` is called at least every second (it raises when the job was interrupted)."""
        import ray

        queue = list(chunk_ids)
        running: dict[Any, tuple[Any, str]] = {}

        def submit(actor) -> None:
            chunk = queue.pop(0)
            running[actor.run_chunk.remote(chunk)] = (actor, chunk)

        for actor in self.actors:
            if queue:
                submit(actor)
        done = 0
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            check()
            for ref in ready:
                actor, chunk = running.pop(ref)
                outcome = _get([ref], f"chunk {chunk}")[0]
                if not outcome.ok:
                    _raise_failure(outcome, f"chunk {chunk}")
                done += 1
                progress.update(1)
                if queue:
                    submit(actor)
        return done

    def finalize(self) -> JobSummary:
        outcome, summary = _get([self.actors[0].finalize.remote()], "finalize")[0]
        if not outcome.ok:
            _raise_failure(outcome, "finalize")
        if not isinstance(summary, JobSummary):
            raise JobError(f"finalize returned {type(summary).__name__}, expected interplab.jobs.JobSummary")
        return summary

    def kill(self) -> None:
        """Kill the workers (their stage actors die with them) and release their stages' placement
        groups, which would otherwise stay reserved until the job ends (a retry could not place its own)."""
        import ray

        from interplab.runtime import cluster

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already dead
                pass
        cluster.release_placements(ray.get_runtime_context().get_job_id())


def _check_workers_fit(wanted: dict[str, float], count: int) -> None:
    """Refuse worker actors that no node of a cluster that cannot grow could ever hold."""
    from interplab.runtime import cluster

    nodes = cluster.cluster_nodes()
    if cluster.bundles_fit(wanted, count, [n.usable() for n in nodes]) or cluster.can_autoscale():
        return
    raise JobError(
        f"the cluster can never start the job's workers and has no autoscaler to add nodes: "
        f"{cluster.describe_placement(wanted, count, nodes, 'worker(s)')}; lower 'workers' or 'resources'"
    )


class _Waiting:
    """Says what a wait is for, :data:`~interplab.runtime.cluster.REPORT_AFTER_S` into it and then
    every :data:`~interplab.runtime.cluster.REPORT_EVERY_S`: worker actors the cluster has not
    started yet, and this job's placement groups (pipeline stages) it has not placed."""

    def __init__(self, echo: Echo, actors: list, wanted: dict[str, float]):
        from interplab.runtime import cluster

        self._echo = echo
        self._actors = actors
        self._wanted = wanted
        self._next = cluster.REPORT_AFTER_S

    def __call__(self, waited_s: float) -> None:
        import ray

        from interplab.runtime import cluster

        if waited_s < self._next:
            return
        self._next = waited_s + cluster.REPORT_EVERY_S
        lines = cluster.waiting_placements(ray.get_runtime_context().get_job_id())
        pending = sum(_actor_state(a) in ("DEPENDENCIES_UNREADY", "PENDING_CREATION") for a in self._actors)
        if pending:
            lines.insert(
                0,
                "workers: waiting for the cluster to start them: "
                f"{cluster.describe_placement(self._wanted, pending, cluster.cluster_nodes(), 'worker(s)')}",
            )
        for line in lines:
            self._echo(f"still waiting after {waited_s:.0f} s; {line}")


def _actor_state(actor) -> str:
    try:
        from ray._private import state

        return str(state.actors(actor_id=actor._actor_id.hex()).get("State", ""))
    except Exception:  # noqa: BLE001 - the report is best effort
        return ""


def _wait(refs: list, what: str, check: Callable[[], None], waiting: Callable[[float], None]) -> list:
    """``ray.get(refs)``, a second at a time: ``check()`` (interrupts) and ``waiting(seconds)`` between."""
    import ray

    started = time.monotonic()
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        check()
        if pending:
            waiting(time.monotonic() - started)
    return _get(refs, what)


def _get(refs: list, what: str) -> list:
    import ray
    from ray.exceptions import RayError

    try:
        return ray.get(refs)
    except RayError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobError(f"{what}: a Ray worker failed ({type(exc).__name__}: {first})") from None


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="chunk", desc=desc, file=sys.stderr, dynamic_ncols=True)


def run_job(
    job: PreparedJob,
    store_uri: str,
    *,
    run_id: str | None = None,
    resume: bool = False,
    retries: int | None = None,
    progress: bool = True,
    echo: Echo = print,
    recompute: bool = False,
) -> JobResult:
    """Run ``job`` into the store at ``store_uri`` and commit it (see the module docstring).

    ``run_id`` with ``resume=False`` names a new run; with ``resume=True`` it continues that run
    (``running`` or ``failed``). Raises :class:`JobError` (the run is then marked failed) or
    :class:`JobInterrupted`.

    Before Ray starts, a new run looks for a committed run with the job's content key in every
    readable store (:mod:`interplab.jobs.reuse`) and returns it (``reused``) instead of computing;
    ``recompute`` computes anyway.
    """
    from interplab.jobs.model import served_name
    from interplab.serve.jobrun import ServedWorkers, no_ray
    from interplab.store import open_store

    started = time.perf_counter()
    phases: dict[str, float] = {}  # the driver's per-phase seconds, recorded with the commit (run timings)
    from interplab.jobs.reuse import ReferenceWorkers, ReuseStep, before_run, references_only

    step = ReuseStep()
    if not resume:
        step = before_run(job, store_uri, recompute=recompute, lookup=run_id is None, echo=echo)
        found = step.found
        if found is not None:
            kept = JobSummary(**(found.run.metadata.get("summary") or {})).for_run(found.run.run_id)
            n = int(found.run.metadata.get("n_chunks") or len(job.chunk_ids))
            return JobResult(found.run.run_id, found.store, kept, n, 0, 0, time.perf_counter() - started, True, found.describe())
    retries = job.spec.retries if retries is None else retries
    writer: Any = None
    store: Any = None
    attempts = 0
    n_computed = 0
    referenced = step.complete  # every row is in committed runs: references only, here (jobs/reuse.py)
    if not referenced and served_name(job.spec) is None:  # a served model starts no Ray
        address = os.environ.get("RAY_ADDRESS")
        echo(f"connecting to Ray at {address}" if address else "starting an embedded local Ray")
    with _Interrupts() as interrupts:
        try:
            served = served_name(job.spec) is not None  # a served model: chunks run here, no Ray (serve/jobrun.py)
            session = references_only() if referenced else ray_session(job.spec.workers * job.spec.resources.num_cpus)
            with no_ray() if served else session as where:
                interrupts.install()  # ray.init put its own SIGTERM handler in place
                interrupts.check()
                phases["start_s"] = round(time.perf_counter() - started, 3)
                echo(f"{job.kind.name} job on {where}: {len(job.chunk_ids)} chunk(s)")
                summary = None
                while summary is None:
                    attempts += 1
                    workers: Any = None  # Ray workers, served, or references only
                    try:
                        loading = time.perf_counter()
                        if served:
                            workers = ServedWorkers(job.record, job.spec.model, echo)
                        elif referenced:
                            workers = ReferenceWorkers(job, echo)
                        else:
                            workers = _Workers(job, echo, interrupts.check)
                        _add_phase(phases, "model_load_s", loading)
                        if writer is None:
                            store = open_store(store_uri)
                            writer = open_run(store, job, workers.info, run_id, resume)
                            run_id = writer.run_id
                            echo(f"run_id: {run_id}")
                        workers.attach(store.uri, writer.run_id)
                        done = {chunk_key(c) for c in writer.written_chunks(JOB_CHUNKS_TABLE)}
                        todo = [c for c in job.chunk_ids if chunk_key(c) not in done]
                        computing = time.perf_counter()
                        bar = _progress(len(job.chunk_ids), len(job.chunk_ids) - len(todo), writer.run_id, progress)
                        try:
                            n_computed += workers.run(todo, bar, interrupts.check)
                        finally:
                            bar.close()
                        _add_phase(phases, "compute_s", computing)
                        finalizing = time.perf_counter()
                        summary = workers.finalize()
                        _add_phase(phases, "finalize_s", finalizing)
                    except JobInterrupted:
                        raise
                    except JobError as exc:
                        if attempts > retries or writer is None:
                            raise
                        echo(
                            f"attempt {attempts} failed ({exc}); retrying the missing chunks "
                            f"({retries - attempts + 1} retr{'y' if retries - attempts + 1 == 1 else 'ies'} left)"
                        )
                    finally:
                        if workers is not None:
                            workers.kill()
                interrupts.disarm()  # all done: a signal from here on (commit, Ray shutting down) changes nothing
                writer.commit(
                    {
                        "summary": {"lines": summary.lines, "sql": summary.sql},
                        "n_chunks": len(job.chunk_ids),
                        "attempts": attempts,
                        "timings": {"wall_s": round(time.perf_counter() - started, 3), "phases": phases},
                    }
                )
        except KeyboardInterrupt:
            interrupts.disarm()
            reason = interrupts.reason or "interrupted (Ctrl-C)"
            _fail(writer, reason)
            raise _located(JobInterrupted(reason), writer, store) from None
        except JobError as exc:
            interrupts.disarm()
            _fail(writer, f"{type(exc).__name__}: {exc}")
            raise _located(exc, writer, store)  # noqa: B904 - the error keeps its own chain (a stage error's cause)
        except BaseException as exc:
            interrupts.disarm()
            _fail(writer, f"{type(exc).__name__}: {exc}")
            raise
    return JobResult(
        writer.run_id,
        store.uri,
        summary.for_run(writer.run_id),
        len(job.chunk_ids),
        n_computed,
        attempts,
        time.perf_counter() - started,
    )


def _located(exc: JobError, writer, store) -> JobError:
    """Attach the run id and store to a job error (the CLI prints how to resume)."""
    exc.run_id = writer.run_id if writer is not None else None
    exc.store = store.uri if store is not None else None
    return exc


def _fail(writer, reason: str) -> None:
    if writer is None:
        return
    try:
        writer.fail(reason)
    except Exception:  # noqa: BLE001 - the original error matters more
        log.exception("could not mark run %s failed", writer.run_id)


def _add_phase(phases: dict[str, float], name: str, since: float) -> None:
    """Add the seconds since ``since`` to ``phases[name]`` (a retried attempt adds to the first)."""
    phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - since, 3)


def open_run(store, job: PreparedJob, info: dict[str, str], run_id: str | None, resume: bool):
    """Begin the run, or reopen it for ``resume``."""
    if resume:
        return store.resume_run(run_id)
    return store.begin_run(
        job.kind.name,
        model=info.get("name") or job.spec.model,
        spec=job.record,
        weight_hash=info.get("weight_hash"),
        run_id=run_id,
        provenance={**job.provenance, "chunks": len(job.chunk_ids), "host_device": info.get("device")},
        # the runs it read, and the runs whose rows it references (jobs/reuse.py)
        inputs=[*job.inputs, *(job.provenance.get("reuse_sources") or [])],
        owner=job.owner,
        team=job.team,
        git=job.git,
        dataset_hash=job.dataset_hash,
    )
