"""Errors across the stage-actor boundary.

A failure of the work inside a stage actor (a bad intervention, a metric that raises) reaches the
caller as the same exception class the single-process backend raises, chained to a
:class:`StageError` that names the stage, its layers and the micro-batch's prompts and holds the
actor's traceback (``exc.__cause__``). A failure of the machinery (an actor that died too often, a
stage that could not start) is a :class:`StageError` itself.
"""

from __future__ import annotations

from typing import NoReturn

STAGE_ATTR = "stage_error"  # the StageError attached to an exception raised inside a stage


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
        self.layers: tuple[int, int] = (layers[0], layers[1])
        self.prompt_ids = list(prompt_ids)
        self.cause_type = cause_type
        self.detail = detail
        self.remote_traceback = remote_traceback
        super().__init__(self._message())

    def where(self) -> str:
        ids = self.prompt_ids
        shown = ", ".join(str(i) for i in ids[:8]) + (f", ... ({len(ids)} prompts)" if len(ids) > 8 else "")
        return f"stage {self.stage} (layers {self.layers[0]}..{self.layers[1] - 1}) on prompts [{shown}]"

    def _message(self) -> str:
        return f"{self.where()} failed: {self.cause_type}: {self.detail}"

    def __str__(self) -> str:
        if not self.remote_traceback:
            return self._message()
        return f"{self._message()}\n\nTraceback in the stage actor:\n{self.remote_traceback.rstrip()}"

    def __reduce__(self):
        args = (self.stage, self.layers, self.prompt_ids, self.cause_type, self.detail, self.remote_traceback)
        return (StageError, args)


def attach(exc: BaseException, error: StageError) -> BaseException:
    """Mark ``exc`` (raised inside a stage) with where it happened; it keeps its own class."""
    if getattr(exc, STAGE_ATTR, None) is None:
        try:
            setattr(exc, STAGE_ATTR, error)
        except AttributeError:  # an exception class with __slots__: report it as a StageError
            return error
    return exc


def unwrap(exc: BaseException) -> BaseException:
    """The user-facing exception for an error from Ray: the stage's own exception (its class kept,
    see the module docstring), a clean :class:`StageError`, or ``exc`` itself."""
    import ray

    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else exc
    if isinstance(cause, StageError):
        return StageError(
            cause.stage,
            (cause.layers[0], cause.layers[1]),
            cause.prompt_ids,
            cause.cause_type,
            cause.detail,
            cause.remote_traceback,
        )
    if cause is not None and isinstance(getattr(cause, STAGE_ATTR, None), StageError):
        return cause
    return exc


def reraise(exc: BaseException) -> NoReturn:
    """Raise :func:`unwrap` of ``exc``: a stage's exception is chained to its :class:`StageError`
    (``__cause__``: stage, layers, prompts, the actor's traceback); Ray's own wrapping is dropped."""
    error = unwrap(exc)
    where = getattr(error, STAGE_ATTR, None)
    if isinstance(where, StageError):
        note = f"raised in {where.where()} (the actor's traceback: exc.__cause__)"
        if note not in getattr(error, "__notes__", []) and hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(note)
        raise error.with_traceback(None) from where
    raise error from None
