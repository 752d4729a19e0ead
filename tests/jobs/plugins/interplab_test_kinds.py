"""A job kind for tests, loaded through ``$INTERPLAB_JOB_KINDS`` (the plugin mechanism).

``flaky``: ``n_chunks`` chunks, each writes one row to the ``flaky`` table after sleeping ``sleep``
seconds; the chunks named in ``fail_once`` raise the first time they run (a marker file in
``state_dir`` remembers), to exercise retries and resume.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import NonNegativeFloat, PositiveInt

from interplab.jobs import JobSpec, JobSummary, register_kind


class FlakySpec(JobSpec):
    kind: Literal["flaky"]
    model: str = "tiny-llama"
    n_chunks: PositiveInt = 4
    fail_once: list[str] = []
    state_dir: str
    sleep: NonNegativeFloat = 0.0


class FlakyRunner:
    def validate(self, spec: FlakySpec, model) -> None:
        pass

    def chunks(self, spec: FlakySpec, model) -> list[str]:
        return [f"c{i}" for i in range(spec.n_chunks)]

    def run_chunk(self, spec: FlakySpec, model, chunk_id: str, writer) -> None:
        time.sleep(spec.sleep)
        marker = Path(spec.state_dir) / f"failed-{chunk_id}"
        if chunk_id in spec.fail_once and not marker.exists():
            marker.write_text("x")
            raise RuntimeError(f"injected failure in {chunk_id}")
        with open(Path(spec.state_dir) / "calls.log", "a") as log:
            log.write(chunk_id + "\n")
        writer.write_table("flaky", pa.table({"chunk": [chunk_id], "value": [int(chunk_id[1:]) ** 2]}), chunk=chunk_id)

    def finalize(self, spec: FlakySpec, model, writer) -> JobSummary:
        return JobSummary(lines=[f"{spec.n_chunks} flaky chunks"], sql=["SELECT * FROM flaky WHERE run_id = '{run_id}'"])


register_kind("flaky", FlakySpec, FlakyRunner())
