"""A job kind for tests whose chunk waits at a gate, loaded through ``$INTERPLAB_JOB_KINDS``.

``gated``: ``n_chunks`` chunks ``c0``, ``c1``, ... run in order on one worker, each writing one row to
the ``gated`` table. Chunk ``c<gate>`` first writes ``<state_dir>/at-gate``, then waits until
``<state_dir>/gate-open`` exists. A test that sees ``at-gate`` knows, from a file and not from the
clock, that exactly ``gate`` chunks are done and the job is busy in the next one: it can signal the
job there, with nothing left that could finish before the signal is handled. (``gate_timeout_s``
only stops a forgotten gate from holding a worker forever.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from interplab.jobs import JobSpec, JobSummary, register_kind

AT_GATE = "at-gate"
GATE_OPEN = "gate-open"


class GatedSpec(JobSpec):
    kind: Literal["gated"]
    model: str = "tiny-llama"
    n_chunks: PositiveInt = 8
    gate: NonNegativeInt = 3
    state_dir: str
    gate_timeout_s: PositiveFloat = 600.0


class GatedRunner:
    def validate(self, spec: GatedSpec, model) -> None:
        pass

    def chunks(self, spec: GatedSpec, model) -> list[str]:
        return [f"c{i}" for i in range(spec.n_chunks)]

    def run_chunk(self, spec: GatedSpec, model, chunk_id: str, writer) -> None:
        index = int(chunk_id[1:])
        if index == spec.gate:
            state = Path(spec.state_dir)
            (state / AT_GATE).write_text(chunk_id)
            deadline = time.monotonic() + spec.gate_timeout_s
            while not (state / GATE_OPEN).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{chunk_id}: the gate was not opened within {spec.gate_timeout_s:g} s")
                time.sleep(0.02)
        writer.write_table("gated", pa.table({"chunk": [chunk_id], "value": [index]}), chunk=chunk_id)

    def finalize(self, spec: GatedSpec, model, writer) -> JobSummary:
        return JobSummary(lines=[f"{spec.n_chunks} gated chunks"], sql=["SELECT * FROM gated WHERE run_id = '{run_id}'"])


register_kind("gated", GatedSpec, GatedRunner())
