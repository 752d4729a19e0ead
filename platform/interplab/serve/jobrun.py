"""Running a job's chunks against a served model: in the driver's own process, without Ray.

A job whose spec names a served model (``model: serve://NAME``) loads nothing: its chunks' forward
passes are requests to the service, which batches them with everyone else's. Starting Ray and a
worker actor would only add seconds, so :func:`interplab.jobs.execute.run_job` drives a
:class:`ServedWorkers` here instead of its Ray workers: the same :class:`~interplab.jobs.worker.ChunkWorker`
(the same ``load``/``attach``/``run_chunk``/``finalize``), called in this process, chunk after
chunk. Failures become :class:`~interplab.jobs.errors.JobError` as on Ray, so retries and resuming
work the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from interplab.jobs.errors import JobError
from interplab.jobs.registry import JobSummary
from interplab.jobs.worker import ChunkOutcome, ChunkWorker


def _raise(outcome: ChunkOutcome, what: str) -> None:
    raise JobError(
        f"{what} failed: {outcome.error_type}: {outcome.error}", chunk=outcome.chunk, remote_traceback=outcome.traceback
    )


@contextmanager
def no_ray() -> Iterator[str]:
    """What ``run_job`` enters instead of a Ray session for a served model."""
    yield "the service (no Ray started: the model is served)"


class ServedWorkers:
    """One in-process :class:`ChunkWorker` on a served model (the interface of the driver's Ray workers)."""

    def __init__(self, record: dict[str, Any], model: str, echo: Callable[[str], None]) -> None:
        echo(f"running against the served model {model} (no model load)")
        self.worker = ChunkWorker(record, "cpu")
        outcome, info = self.worker.load()
        if not outcome.ok:
            _raise(outcome, "connecting to the served model")
        self.info = {**info, "device": "service"}

    def attach(self, store_uri: str, run_id: str) -> None:
        outcome = self.worker.attach(store_uri, run_id)
        if not outcome.ok:
            _raise(outcome, "opening the store")

    def run(self, chunk_ids: list[str], progress: Any, check: Callable[[], None]) -> int:
        done = 0
        for chunk in chunk_ids:
            check()
            outcome = self.worker.run_chunk(chunk)
            if not outcome.ok:
                _raise(outcome, f"chunk {chunk}")
            done += 1
            progress.update(1)
        return done

    def finalize(self) -> JobSummary:
        outcome, summary = self.worker.finalize()
        if not outcome.ok:
            _raise(outcome, "finalize")
        if not isinstance(summary, JobSummary):
            raise JobError(f"finalize returned {type(summary).__name__}, expected interplab.jobs.JobSummary")
        return summary

    def kill(self) -> None:
        """Close the connection to the service (the model stays served)."""
        model = getattr(self.worker, "_model", None)
        session = getattr(model, "session", None)
        if session is not None:
            session.close()
