"""The registry of job kinds: ``register_kind(name, spec_cls, runner)``.

A kind is a pydantic spec class (a :class:`~interplab.jobs.spec.JobSpec` subclass whose ``kind`` is
``Literal[name]``) plus a *runner* that the job driver calls in this order::

    runner.validate(spec, model)                  # driver, before anything is written
    ids = runner.chunks(spec, model)              # driver; stable ids, resume skips written ones
    runner.run_chunk(spec, model, chunk_id, writer)   # Ray workers, once per missing chunk
    summary = runner.finalize(spec, model, writer)    # one worker, after every chunk; then commit

``validate`` and ``chunks`` get a *light* model (tokenizer, config, ``validate_site``; weights may be
on the meta device, so no forward passes); ``run_chunk`` and ``finalize`` get the full model.
``validate`` raises :class:`~interplab.jobs.errors.SpecError` naming the field path (use
:func:`~interplab.jobs.errors.at_path` to convert ``SiteError``/``TokenizationError``).
``run_chunk`` must be idempotent: it writes only through ``writer`` with ``chunk=chunk_id``
(``writer.write_table(name, table, chunk=chunk_id)`` or ``write_capture_chunk``).
An optional ``provenance(spec) -> dict`` adds facts to the run record (e.g. a dataset hash) that a
resume must find unchanged. An optional ``layer_work(spec, model) -> LayerWork | None`` (``model``: the
meta-device skeleton, for sizes) gives the relative compute of each decoder layer and of the head
(:class:`~interplab.runtime.split.LayerWork`); a pipeline (``parallel: {stages: N}``) balances its
stages by it.

``register_kind(..., plot=fn)`` gives the kind its picture for ``interplab plot RUN_ID -o FILE``:
``fn(store, run_id, output, method) -> list[Path]`` (a :class:`PlotFunction`) reads the run's rows
with ``store.sql`` and writes ``output`` (and any files beside it), returning the paths written.

Kinds are found through the ``interplab.kinds`` entry points (:mod:`interplab.jobs.kinds`); the first
:func:`get_kind` of a name imports the module that registers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import ValidationError

from interplab.jobs.errors import MISSING, SpecError
from interplab.jobs.spec import JobSpec, format_validation_error

if TYPE_CHECKING:
    from interplab.engine.backend import Backend
    from interplab.store import Store
    from interplab.store.writer import RunWriter


@dataclass(frozen=True)
class JobSummary:
    """What ``interplab run`` prints after a commit: short lines and SQL queries to look at results.

    ``{run_id}`` in ``lines`` and ``sql`` is replaced by the run's id."""

    lines: list[str] = field(default_factory=list)
    sql: list[str] = field(default_factory=list)

    def for_run(self, run_id: str) -> JobSummary:
        return JobSummary(
            [line.replace("{run_id}", run_id) for line in self.lines], [q.replace("{run_id}", run_id) for q in self.sql]
        )


@runtime_checkable
class JobRunner(Protocol):
    def validate(self, spec: Any, model: Backend) -> None: ...

    def chunks(self, spec: Any, model: Backend) -> list[str]: ...

    def run_chunk(self, spec: Any, model: Backend, chunk_id: str, writer: RunWriter) -> None: ...

    def finalize(self, spec: Any, model: Backend, writer: RunWriter) -> JobSummary: ...


class PlotFunction(Protocol):
    """A kind's picture of one run: write ``output`` (and files beside it), return the paths written.

    ``method`` is ``interplab plot --method`` (which of the run's methods to draw), None when not given."""

    def __call__(self, store: Store, run_id: str, output: Path, method: str | None) -> list[Path]: ...


@dataclass(frozen=True)
class JobKind:
    name: str
    spec_cls: type[JobSpec]
    runner: JobRunner
    plot: PlotFunction | None = None


_KINDS: dict[str, JobKind] = {}


def register_kind(name: str, spec_cls: type[JobSpec], runner: JobRunner, *, plot: PlotFunction | None = None) -> JobKind:
    """Register a job kind (call it at import of the kind's module).

    Registering a name again with the same spec class replaces the entry (a kind's entry-point module
    may add the plot to a kind its job module registered); another spec class under a taken name is
    an error."""
    if not (isinstance(spec_cls, type) and issubclass(spec_cls, JobSpec)):
        raise TypeError(f"job kind {name!r}: spec_cls must subclass interplab.jobs.JobSpec")
    missing = [m for m in ("validate", "chunks", "run_chunk", "finalize") if not callable(getattr(runner, m, None))]
    if missing:
        raise TypeError(f"job kind {name!r}: runner lacks {', '.join(missing)}")
    if plot is not None and not callable(plot):
        raise TypeError(f"job kind {name!r}: plot must be a function (store, run_id, output, method) -> list[Path]")
    existing = _KINDS.get(name)
    if existing is not None and (existing.spec_cls.__qualname__, existing.spec_cls.__module__) != (
        spec_cls.__qualname__,
        spec_cls.__module__,
    ):
        raise ValueError(f"job kind {name!r} is already registered by {existing.spec_cls.__module__}")
    kind = JobKind(name, spec_cls, runner, plot)
    _KINDS[name] = kind
    return kind


def registered_kinds() -> list[str]:
    """The kinds registered in this process so far (imports nothing; see :func:`kind_names`)."""
    return sorted(_KINDS)


def kind_names() -> list[str]:
    """Every kind: installed (entry points, not imported), ``$INTERPLAB_JOB_KINDS`` and registered ones."""
    from interplab.jobs.kinds import entry_point_kinds, load_extra_kinds

    load_extra_kinds()
    return sorted(set(entry_point_kinds()) | set(_KINDS))


def get_kind(name: str) -> JobKind:
    """The kind ``name``, importing its module on first use.

    Raises :class:`~interplab.jobs.kinds.KindLoadError` if the kind's module fails to load and
    :class:`SpecError` if no kind has that name."""
    from interplab.jobs.kinds import KINDS_GROUP, load_kind

    load_kind(name)
    if name not in _KINDS:
        known = kind_names()
        allowed = ", ".join(known) or (
            f"none installed: no {KINDS_GROUP!r} entry points (reinstall interplab, e.g. pip install -e ., to refresh them)"
        )
        raise SpecError("kind", "unknown job kind", name, allowed)
    return _KINDS[name]


def parse_spec(raw: Any, source: str = "") -> JobSpec:
    """Validate a raw mapping (from YAML or a stored run) as its kind's spec model.

    Raises :class:`SpecError`/:class:`SpecErrors` (with ``source`` as the file name)."""
    try:
        if not isinstance(raw, dict):
            raise SpecError("(spec)", "a spec must be a mapping of fields", raw, "kind: ..., model: ...")
        raw = dict(raw)
        base_dir = raw.pop("__base_dir__", None)
        kind_name = raw.get("kind", MISSING)
        if kind_name is MISSING:
            raise SpecError("kind", "required field is missing", MISSING, ", ".join(kind_names()))
        if not isinstance(kind_name, str):
            raise SpecError("kind", "must be a string", kind_name, ", ".join(kind_names()))
        kind = get_kind(kind_name)
        resolve = getattr(kind.spec_cls, "resolve_paths", None)
        if resolve is not None and base_dir is not None:
            raw = resolve(raw, base_dir)
        return kind.spec_cls.model_validate(raw)
    except ValidationError as exc:
        errors = format_validation_error(exc, kind.spec_cls, raw, source)
        raise errors.errors[0] if len(errors.errors) == 1 else errors from None
    except SpecError as exc:
        raise exc.with_source(source) if source and not exc.source else exc from None
