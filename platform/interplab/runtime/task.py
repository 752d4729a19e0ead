"""What a stage actor loads (:class:`StageSpec`) and what it runs for one micro-batch (:class:`StageTask`).

A task carries only what its stage owns: the captures, interventions and gradient sites of its
layers, the layer span it runs, where its rows enter (for passes that start mid-model) and what it
sends on. Plain frozen values: they cross process boundaries by Ray's serialisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from interplab.engine.interventions import Intervention
    from interplab.engine.plan import KVPrefix, Positions
    from interplab.engine.results import LogitsMode
    from interplab.engine.sites import Site
    from interplab.engine.tokens import TokenBatch
    from interplab.runtime.sink import StoreSink

Mode = Literal["run", "grad", "train"]


@dataclass(frozen=True)
class StageSpec:
    """What a stage actor loads: model, layer range, dtype, device."""

    index: int
    start: int
    stop: int
    n_layers: int
    n_stages: int
    model: str
    dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"
    threads: int = 1

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.n_layers


@dataclass(frozen=True)
class StageSpan:
    """The layers a task runs and how it ends.

    Attributes:
        start: first layer (None: the stage's first); rows may start mid-model.
        stop: run up to this layer (None: the stage's last); e.g. the last layer a capture needs.
        with_head: finish with the final norm and unembedding (the model's last stage only).
        logits: ``"all"``, ``"last"`` or ``"none"``.
        vocab: ``Long[k]``: the head computes only these logit columns.
    """

    start: int | None = None
    stop: int | None = None
    with_head: bool = False
    logits: LogitsMode = "all"
    vocab: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class StageEntry:
    """How a pass that starts mid-model enters this stage.

    Attributes:
        hidden: ``resid_pre`` of the rows that start at the span's first layer (a chain's first stage).
        joins: layer -> ``resid_pre`` rows that join the batch there.
        prefix: cached keys/values of this stage's layers for the first positions.
    """

    hidden: torch.Tensor | None = None
    joins: Mapping[int, torch.Tensor] | None = None
    prefix: KVPrefix | None = None


@dataclass(frozen=True, eq=False)
class StageTask:
    """One micro-batch's work for one stage.

    Attributes:
        call, mb: the pipeline call and micro-batch (keys of the kept autograd graphs).
        prompt_ids: the rows' prompts (for error messages and store rows).
        batch: the rows' tokens, padded to the whole call's length.
        mode: ``run`` (forward), ``grad`` (keep graphs for site gradients), ``train`` (for a step).
        capture, interventions, grad_sites, positions: the stage's own sites.
        span, entry: the layers it runs and how rows enter (see :class:`StageSpan`, :class:`StageEntry`).
        emit: return the output (False: nothing downstream needs it).
        keep_kv: also return the stage's keys/values: side result ``(captures, {layer: (k, v)})``.
        keep_on_device: return the output on the stage's device (a compiled graph sends it by NCCL).
        sink: write the captures to the store instead of returning them.
        threads: CPU threads for this task (None: the stage's own), lent during fill and drain.
    """

    call: int
    mb: int
    prompt_ids: Sequence[int]
    batch: TokenBatch
    mode: Mode = "run"
    capture: Sequence[Site] = ()
    interventions: Sequence[Intervention] = ()
    grad_sites: Sequence[Site] = ()
    positions: Positions = None
    span: StageSpan = field(default_factory=StageSpan)
    entry: StageEntry | None = None
    emit: bool = True
    keep_kv: bool = False
    keep_on_device: bool = False
    sink: StoreSink | None = None
    threads: int | None = None
