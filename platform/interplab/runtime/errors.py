"""One exception type for failures inside pipeline stages: which stage, which layers, which prompts."""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage actor failed on a micro-batch.

    Attributes:
        stage: stage index; layers: its ``(start, stop)`` range; prompt_ids: the micro-batch's prompts;
        cause_type: the original exception's class name; detail: its message; remote_traceback: the
        traceback inside the actor (kept for debugging, not shown in the message).
    """

    def __init__(
        self,
        stage: int,
        layers: tuple[int, int],
        prompt_ids: list[int],
        cause_type: str,
        detail: str,
        remote_traceback: str = "",
    ) -> None:
        self.stage = stage
        self.layers = tuple(layers)
        self.prompt_ids = list(prompt_ids)
        self.cause_type = cause_type
        self.detail = detail
        self.remote_traceback = remote_traceback
        super().__init__(self._message())

    def _message(self) -> str:
        ids = self.prompt_ids
        shown = ", ".join(str(i) for i in ids[:8]) + (f", ... ({len(ids)} prompts)" if len(ids) > 8 else "")
        return (
            f"stage {self.stage} (layers {self.layers[0]}..{self.layers[1] - 1}) failed on prompts [{shown}]: "
            f"{self.cause_type}: {self.detail}"
        )

    def __reduce__(self):
        args = (self.stage, self.layers, self.prompt_ids, self.cause_type, self.detail, self.remote_traceback)
        return (StageError, args)
