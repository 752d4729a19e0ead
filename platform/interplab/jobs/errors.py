"""The two error types of the job system.

* :class:`SpecError` — the spec is wrong (a usage error: the CLI prints it and exits with code 2).
  It always names the field path (``prompts[1].corrupted``), the bad value and what is allowed.
  :class:`SpecErrors` carries several of them (``interplab validate`` reports every one).
* :class:`JobError` — the job failed while running (a chunk raised, a worker died, Ray went away):
  exit code 1; the run is marked failed and can be resumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class Missing:
    """The value of a field that was not given (shown as ``nothing``)."""

    def __repr__(self) -> str:
        return "nothing"


MISSING = Missing()


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SpecError(ValueError):
    """One error in a job spec: ``path: problem (got VALUE; allowed: ALLOWED)``."""

    def __init__(self, path: str, problem: str, value: object = MISSING, allowed: str = "", *, source: str = ""):
        self.path = path or "(spec)"
        self.problem = problem
        self.value = value
        self.allowed = allowed
        self.source = source
        super().__init__(self.describe())

    def describe(self) -> str:
        head = f"{self.source}: " if self.source else ""
        text = f"{head}{self.path}: {self.problem}"
        details = [f"got {_short(self.value)}"]
        if self.allowed:
            details.append(f"allowed: {self.allowed}")
        return f"{text} ({'; '.join(details)})"

    def with_source(self, source: str) -> SpecError:
        return SpecError(self.path, self.problem, self.value, self.allowed, source=source)


class SpecErrors(ValueError):
    """Several :class:`SpecError` at once (one per line when printed)."""

    def __init__(self, errors: Sequence[SpecError]):
        self.errors = list(errors)
        super().__init__("\n".join(e.describe() for e in self.errors))

    def with_source(self, source: str) -> SpecErrors:
        return SpecErrors([e.with_source(source) for e in self.errors])


class JobError(RuntimeError):
    """A job failed while running (not a spec problem). ``chunk`` names the failing chunk if any."""

    def __init__(self, message: str, *, chunk: str | None = None, remote_traceback: str = ""):
        self.chunk = chunk
        self.remote_traceback = remote_traceback
        self.run_id: str | None = None  # set by the driver once the run exists
        self.store: str | None = None
        super().__init__(message)


class JobInterrupted(JobError):
    """The job was stopped (Ctrl-C, SIGTERM from ``interplab jobs stop``)."""


@contextmanager
def at_path(path: str, value: object = MISSING, allowed: str = "") -> Iterator[None]:
    """Turn a ``ValueError`` raised inside (SiteError, TokenizationError, ...) into a :class:`SpecError`
    at ``path``::

        with at_path(f"prompts[{i}].corrupted", pair.corrupted):
            check_equal_lengths(tokenizer, [pair.clean], [pair.corrupted])
    """
    try:
        yield
    except SpecError:
        raise
    except ValueError as exc:
        raise SpecError(path, str(exc), value, allowed) from None


def check_positions(field: str, positions: Sequence[int], lengths: Sequence[int], where: str) -> None:
    """Every position lies within every prompt (``lengths``: their token counts, from spec field
    ``where``), or one :class:`SpecError` at ``field[j]`` naming the shortest prompt."""
    if not lengths:
        return
    shortest = min(range(len(lengths)), key=lengths.__getitem__)
    n = int(lengths[shortest])
    for j, p in enumerate(positions):
        if not -n <= p < n:
            raise SpecError(
                f"{field}[{j}]",
                f"out of range for {where}[{shortest}], which has {n} tokens",
                p,
                f"{-n}..{n - 1} (negative counts from each prompt's end)",
            )
