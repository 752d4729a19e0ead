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
    if address:
        ray.init(address=address, **options)
        where = f"Ray cluster at {address}"
    else:
        cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **options)
        where = "embedded local Ray"
    try:
        yield where
    finally:
        ray.shutdown()


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (``interplab jobs stop``, Kubernetes) into :class:`JobInterrupted`."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise JobInterrupted("stopped (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_failure(outcome: ChunkOutcome, what: str) -> None:
    raise JobError(f"{what} failed: {outcome.error_type}: {outcome.error}", chunk=outcome.chunk,
                   remote_traceback=outcome.traceback)


class _Workers:
    """The worker actors of one attempt."""

    def __init__(self, job: PreparedJob, echo: Echo):
        import ray

        from interplab.jobs.model import uses_pipeline

        spec = job.spec
        gpus = spec.resources.gpus(ray.cluster_resources().get("GPU", 0.0))
        if uses_pipeline(spec):
            gpus = 0.0  # the stage actors hold the GPUs (parallel.gpus_per_stage); this one coordinates
        device = spec.device if spec.device != "auto" else ("cuda" if gpus > 0 else "cpu")
        actor = ray.remote(ChunkWorker).options(num_cpus=spec.resources.num_cpus, num_gpus=gpus, max_restarts=0)
        self.actors = [actor.remote(job.record, device) for _ in range(spec.workers)]
        self.device = device
        echo(f"starting {spec.workers} worker(s) ({spec.resources.num_cpus:g} CPU, {gpus:g} GPU, {device}) "
             f"with {spec.model}")
        loaded = _get([a.load.remote() for a in self.actors], "loading the model")
        for outcome, _ in loaded:
            if not outcome.ok:
                _raise_failure(outcome, "loading the model")
        self.info = loaded[0][1]

    def attach(self, store_uri: str, run_id: str) -> None:
        for outcome in _get([a.attach.remote(store_uri, run_id) for a in self.actors], "opening the store"):
            if not outcome.ok:
                _raise_failure(outcome, "opening the store")

    def run(self, chunk_ids: list[str], progress) -> int:
        """Run ``chunk_ids`` (one in flight per worker, dynamically balanced); returns how many ran."""
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
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already dead
                pass


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
) -> JobResult:
    """Run ``job`` into the store at ``store_uri`` and commit it (see the module docstring).

    ``run_id`` with ``resume=False`` names a new run; with ``resume=True`` it continues that run
    (``running`` or ``failed``). Raises :class:`JobError` (the run is then marked failed) or
    :class:`JobInterrupted`.
    """
    from interplab.store import open_store

    started = time.perf_counter()
    retries = job.spec.retries if retries is None else retries
    writer = None
    store = None
    attempts = 0
    n_computed = 0
    echo(f"connecting to Ray at {os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else "starting an embedded local Ray")
    try:
        with _stop_on_sigterm(), ray_session(job.spec.workers * job.spec.resources.num_cpus) as where:
            echo(f"{job.kind.name} job on {where}: {len(job.chunk_ids)} chunk(s)")
            summary = None
            while summary is None:
                attempts += 1
                workers = None
                try:
                    workers = _Workers(job, echo)
                    if writer is None:
                        store = open_store(store_uri)
                        writer = _open_run(store, job, workers.info, run_id, resume)
                        run_id = writer.run_id
                        echo(f"run_id: {run_id}")
                    workers.attach(store.uri, run_id)
                    done = {chunk_key(c) for c in writer.written_chunks(JOB_CHUNKS_TABLE)}
                    todo = [c for c in job.chunk_ids if chunk_key(c) not in done]
                    bar = _progress(len(job.chunk_ids), len(job.chunk_ids) - len(todo), run_id, progress)
                    try:
                        n_computed += workers.run(todo, bar)
                    finally:
                        bar.close()
                    summary = workers.finalize()
                except JobInterrupted:
                    raise
                except JobError as exc:
                    if attempts > retries or writer is None:
                        raise
                    echo(f"attempt {attempts} failed ({exc}); retrying the missing chunks "
                         f"({retries - attempts + 1} retr{'y' if retries - attempts + 1 == 1 else 'ies'} left)")
                finally:
                    if workers is not None:
                        workers.kill()
            writer.commit({"summary": {"lines": summary.lines, "sql": summary.sql}, "n_chunks": len(job.chunk_ids),
                           "attempts": attempts})
    except KeyboardInterrupt:
        _fail(writer, "interrupted (Ctrl-C)")
        raise _located(JobInterrupted("interrupted (Ctrl-C)"), writer, store) from None
    except JobError as exc:
        _fail(writer, f"{type(exc).__name__}: {exc}")
        raise _located(exc, writer, store)
    except BaseException as exc:
        _fail(writer, f"{type(exc).__name__}: {exc}")
        raise
    return JobResult(run_id, store.uri, summary.for_run(run_id), len(job.chunk_ids), n_computed, attempts,
                     time.perf_counter() - started)


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


def _open_run(store, job: PreparedJob, info: dict[str, str], run_id: str | None, resume: bool):
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
    )
