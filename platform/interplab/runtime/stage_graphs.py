"""The autograd graphs a stage keeps between the forward and backward halves of a pipeline call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from interplab.engine.hooked import StagePass
    from interplab.runtime.task import StageTask


@dataclass
class KeptPass:
    """One micro-batch's forward pass on this stage: its input (a leaf that requires grad; None on
    the first stage), the pass (output, plan with the gradient tensors) and the task."""

    hidden: torch.Tensor | None
    stage: StagePass
    task: StageTask


class KeptGraphs:
    """Passes by ``(call, micro-batch)``, and the prompts of each call (for error messages)."""

    def __init__(self) -> None:
        self._passes: dict[tuple[int, int], KeptPass] = {}
        self._prompts: dict[int, list[int]] = {}

    def keep(self, task: StageTask, kept: KeptPass) -> None:
        self._passes[(task.call, task.mb)] = kept
        self._prompts.setdefault(task.call, []).extend(task.prompt_ids)

    def get(self, call: int, mb: int) -> KeptPass:
        return self._passes[(call, mb)]

    def release(self, call: int, mbs: Sequence[int]) -> None:
        """Forget micro-batches ``mbs`` of ``call`` (backward done); the call's prompts go with its last."""
        for mb in mbs:
            del self._passes[(call, mb)]
        if not any(key[0] == call for key in self._passes):
            self._prompts.pop(call, None)

    def drop(self, call: int) -> None:
        """Forget every pass of ``call`` (after a failure elsewhere in the pipeline)."""
        for key in [k for k in self._passes if k[0] == call]:
            del self._passes[key]
        self._prompts.pop(call, None)

    def prompts(self, call: int | None) -> list[int]:
        return self._prompts.get(call, []) if call is not None else []
