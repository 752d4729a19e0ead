"""Run a job kind's runner in this process (no Ray): validate, every chunk twice, finalize, commit."""

from __future__ import annotations


def run_job(runner, kind: str, job, model, store):
    """Every chunk runs twice, so a retried chunk that duplicated rows would show; returns (run id, summary)."""
    runner.validate(job, model)
    with store.begin_run(kind, model=job.model, spec=job.model_dump()) as writer:
        for chunk in runner.chunks(job, model):
            runner.run_chunk(job, model, chunk, writer)
            runner.run_chunk(job, model, chunk, writer)  # a retried chunk must not duplicate rows
        summary = runner.finalize(job, model, writer)
        writer.commit()
    return writer.run_id, summary
