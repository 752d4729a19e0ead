"""Jobs on the Ray cluster through Ray's Jobs API (:func:`interplab.jobs.submit.client`, the same
client and token as ``interplab jobs``): list, status, logs, progress from the store, stop."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

LOG_TAIL_CHARS = 20_000
ACTIVE = ("PENDING", "RUNNING")


class JobsUnavailable(RuntimeError):
    """No Jobs API configured, or it cannot be reached (the page says so instead of failing)."""


@dataclass(frozen=True)
class JobsAPI:
    address: str | None
    token_file: str | None = None

    def _client(self) -> Any:
        if not self.address:
            raise JobsUnavailable("no Ray cluster configured: start the dashboard with --jobs-address http://HEAD:8265")
        from interplab.jobs.errors import JobError, SpecError
        from interplab.jobs.submit import client

        try:
            return client(self.address, self.token_file)
        except (JobError, SpecError) as exc:
            raise JobsUnavailable(str(exc)) from None

    def list(self) -> list[dict[str, Any]]:
        jobs = self._call(lambda c: c.list_jobs())
        rows = [_row(j) for j in jobs]
        rows.sort(key=lambda r: (r["status"] not in ACTIVE, -(r["start_time"] or 0)))
        return rows

    def get(self, submission_id: str) -> dict[str, Any]:
        return _row(self._call(lambda c: c.get_job_info(submission_id)))

    def logs(self, submission_id: str) -> str:
        text: str = self._call(lambda c: c.get_job_logs(submission_id))
        return text[-LOG_TAIL_CHARS:]

    def stop(self, submission_id: str) -> bool:
        stopped: bool = self._call(lambda c: c.stop_job(submission_id))
        return stopped

    def _call(self, fn: Any) -> Any:
        client = self._client()
        try:
            return fn(client)
        except RuntimeError as exc:  # the Jobs API's answer for unknown ids and refused requests
            raise LookupError(str(exc).strip().splitlines()[0][:300]) from None
        except (ConnectionError, OSError) as exc:
            raise JobsUnavailable(f"the Ray Jobs API at {self.address} cannot be reached: {exc}") from None


def _row(job: Any) -> dict[str, Any]:
    metadata = dict(job.metadata or {})
    return {
        "submission_id": job.submission_id,
        "status": str(getattr(job.status, "value", job.status)),
        "entrypoint": job.entrypoint,
        "message": job.message,
        "start_time": job.start_time,
        "end_time": job.end_time,
        "started": _when(job.start_time),
        "ended": _when(job.end_time),
        "run_id": metadata.get("interplab_run_id"),
        "metadata": metadata,
    }


def _when(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def progress(store: Any, run_id: str | None) -> dict[str, Any] | None:
    """A job's progress as its run shows it in the store: status and chunks done (markers of the job
    system, ``chunks/<run>/job_chunks``), of the run's total when its summary gives one."""
    if not run_id:
        return None
    from interplab.store import StoreError, fs, layout

    try:
        info = store.run(run_id)
    except StoreError:
        return {"status": "not in this store", "chunks_done": None}
    loc = getattr(store, "location", None)  # a catalog over several stores has none: status only
    try:
        done = len(fs.list_files(loc, loc.path(layout.chunks_dir(run_id), "job_chunks"))) if loc is not None else None
    except (OSError, StoreError):
        done = None
    return {"status": info.status, "chunks_done": done}
