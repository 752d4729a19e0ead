"""``parallel:`` in job specs: how many pipeline stages, how many data-parallel replicas, GPUs per stage.

    parallel: {stages: 2, replicas: 1, gpus_per_stage: 1}
    parallel: {stages: [[0, 12], [12, 30]]}       # explicit layer ranges [start, stop)
    parallel: {stages: auto, gpus_per_stage: 1}   # as few stages as fit in free GPU memory
    parallel: {stages: 2, balance: layers}        # a count split evenly by layers, whatever the job

``stages: 1`` with one replica runs the single-process engine without Ray (same answers).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

StagesSpec = int | list[list[int]] | Literal["auto"]
DEFAULT_PLACEMENT_TIMEOUT_S = 600.0


class ParallelConfig(BaseModel):
    """How a model is spread over Ray actors. Validates itself; unknown keys are errors.

    Attributes:
        stages: a stage count (split as ``balance`` says), explicit ``[[start, stop], ...]`` layer ranges
            covering ``[0, n_layers)`` in order, or ``"auto"`` (split by parameter bytes and free
            device memory, see :func:`interplab.runtime.split.split_by_memory`).
        balance: how a stage *count* splits the layers. ``"work"`` (default): by the relative compute
            per layer that the job's analysis declares (exact patching sweeps start each row at its
            patched layer, so layer ``l`` runs about ``l + 1`` times the rows of layer 0), evenly
            by layers when it declares none; ``"layers"``: always evenly by layers.
        replicas: data-parallel copies of the pipeline, pulling micro-batches from one queue.
        gpus_per_stage: GPUs per stage actor; fractions (``0.5``) let stages share a GPU; ``0`` runs
            on CPU.
        cpus_per_stage: CPU share reserved per stage actor (fractions keep small machines from
            deadlocking; each stage runs torch with ``max(1, round(cpus_per_stage))`` threads).
        micro_batches: micro-batches each ``run``/``gradients``/training batch is split into (GPipe);
            None means twice the number of stages.
        max_retries: times a micro-batch is retried after a stage actor died.
        transport: how ``run`` calls move hidden states between stages: ``"refs"`` (Ray object
            references; the driver submits each micro-batch as a chain of actor calls),
            ``"compiled"`` (one Ray Compiled Graph per replica, compiled once and reused; NCCL between
            GPU stages, shared memory on CPU) or ``"auto"`` (compiled when stages are on GPUs, refs on
            CPU). Gradients, training and store captures use refs either way.
        lend_cores: CPU stages of one replica on one node lend their torch threads to a busy stage
            while they are idle in a ``run`` call's pipeline fill and drain (the first micro-batch
            runs on the first stage with the downstream stages' threads too, the last one on the last
            stage with the upstream stages'), as stages sharing a GPU share it by themselves.
        placement_timeout_s: seconds a replica waits for the cluster to reserve its stage bundles
            before it fails. Bundles the cluster can never hold (its nodes are too small, counting
            what the job already holds, and no autoscaler can add nodes) fail at once; a replica
            still waiting after a few seconds says what it wants and what each node has
            (:mod:`interplab.runtime.cluster`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: StagesSpec = 1
    balance: Literal["work", "layers"] = "work"
    replicas: int = Field(default=1, ge=1)
    gpus_per_stage: float = Field(default=0.0, ge=0)
    cpus_per_stage: float = Field(default=0.1, gt=0)
    micro_batches: int | None = Field(default=None, ge=1)
    max_retries: int = Field(default=3, ge=0)
    transport: Literal["auto", "refs", "compiled"] = "auto"
    lend_cores: bool = True
    placement_timeout_s: float = Field(default=DEFAULT_PLACEMENT_TIMEOUT_S, gt=0)

    @field_validator("stages", mode="before")
    @classmethod
    def _check_stages(cls, value):
        if isinstance(value, bool):
            raise ValueError(f"stages must be a positive int, a list of [start, stop] layer ranges or 'auto', got {value!r}")
        if isinstance(value, str):
            if value.strip().isdigit():
                value = int(value)
            elif value != "auto":
                raise ValueError(f"stages must be a positive int, a list of [start, stop] layer ranges or 'auto', got {value!r}")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"stages must be at least 1, got {value}")
        if isinstance(value, (list, tuple)):
            value = [list(r) for r in value]
            check_ranges(value)
        return value

    @field_validator("gpus_per_stage")
    @classmethod
    def _check_gpus(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"gpus_per_stage above 1 must be a whole number, got {value}")
        return value

    @property
    def single_process(self) -> bool:
        """True when the config needs no Ray: one stage, one replica."""
        one = self.stages == 1 or (isinstance(self.stages, list) and len(self.stages) == 1)
        return one and self.replicas == 1


def check_ranges(ranges: list[list[int]], n_layers: int | None = None) -> list[tuple[int, int]]:
    """Check explicit ``[[start, stop], ...]`` stage ranges: contiguous, non-empty, from layer 0."""
    if not ranges:
        raise ValueError("stages: an explicit split needs at least one [start, stop] range")
    out: list[tuple[int, int]] = []
    expected = 0
    for i, item in enumerate(ranges):
        if len(item) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            raise ValueError(f"stages[{i}] must be [start, stop] (two ints), got {item!r}")
        start, stop = item
        if start != expected:
            raise ValueError(
                f"stages[{i}] = {item!r} must start at layer {expected}: ranges are contiguous and begin at 0, "
                "e.g. [[0, 12], [12, 30]]"
            )
        if stop <= start:
            raise ValueError(f"stages[{i}] = {item!r} is empty; stop must be greater than start")
        out.append((start, stop))
        expected = stop
    if n_layers is not None and expected != n_layers:
        raise ValueError(f"stages {ranges!r} end at layer {expected} but the model has {n_layers} layers")
    return out
