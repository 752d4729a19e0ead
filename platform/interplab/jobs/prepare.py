"""Everything that happens before a job touches the store: parse, validate, plan its chunks.

:func:`prepare` runs pydantic validation, the common semantic checks and the kind's own
``validate``, then asks for the chunk ids. The common checks are all that can be told without Ray
from the spec, the model's config and its tokenizer: the store URI (the spec's own too, when
``--store`` overrides it), ``parallel`` (as a config, then its stage split against the model's
layers, by :func:`interplab.runtime.split.resolve_stages`), the model loads, and every prompt fits
the model's context (``max_position_embeddings``). Any problem is a :class:`SpecError`, the CLI
exits 2, and nothing has been written anywhere and no Ray started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from interplab.jobs.errors import SpecError, SpecErrors
from interplab.jobs.model import check_parallel, check_stage_split, served_name, service_provenance, validation_model
from interplab.jobs.registry import JobKind, get_kind, parse_spec
from interplab.jobs.spec import JobSpec

if TYPE_CHECKING:
    from interplab.store.fs import Location


@dataclass
class PreparedJob:
    spec: JobSpec
    kind: JobKind
    chunk_ids: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    # recorded with the run (interplab.store.provenance); owner/team None → resolved by the store
    owner: str | None = None
    team: str | None = None
    inputs: list[str] = field(default_factory=list)
    git: dict[str, Any] | None = None  # the spec file's repository: commit, dirty, repo
    dataset_hash: str | None = None

    @property
    def record(self) -> dict[str, Any]:
        return self.spec.to_record()


def resolve_store(cli_store: str | None, spec: JobSpec) -> tuple[str, str]:
    """The store URI (``--store`` > spec ``store`` > ``$INTERPLAB_STORE`` > default) and the path of
    the setting it came from (for errors)."""
    from interplab.store.fs import DEFAULT_STORE, STORE_ENV

    if cli_store:
        return cli_store, "--store"
    if spec.store:
        return spec.store, "store"
    if os.environ.get(STORE_ENV):
        return os.environ[STORE_ENV], f"${STORE_ENV}"
    return DEFAULT_STORE, "store"


_STORE_ALLOWED = "a directory or s3://bucket/prefix"


def check_store_uri(uri: str, path: str) -> Location:
    """Refuse a malformed store URI (scheme, bucket); returns its resolved location. Looks at nothing."""
    from interplab.store import StoreError, fs

    try:
        return fs.resolve(uri)
    except StoreError as exc:
        raise SpecError(path, str(exc), uri, _STORE_ALLOWED) from None


def check_store(uri: str, path: str) -> str:
    """Refuse a store URI that cannot be used, without creating or writing anything."""
    from interplab.store import layout

    allowed = _STORE_ALLOWED
    loc = check_store_uri(uri, path)
    if loc.local:
        if os.path.exists(loc.root) and not os.path.isdir(loc.root):
            raise SpecError(path, "is a file, not a store directory", uri, allowed)
        marker = os.path.join(loc.root, layout.MARKER)
        if os.path.isdir(loc.root) and os.listdir(loc.root) and not os.path.exists(marker):
            raise SpecError(
                path,
                "is a non-empty directory that is not an interplab store",
                uri,
                "an existing store, an empty or a new directory",
            )
    return loc.uri


def prepare(raw_or_spec: dict[str, Any] | JobSpec, source: str = "", *, store: str | None = None) -> tuple[PreparedJob, str]:
    """Validate fully (pydantic + semantic) and plan the chunks; return the job and its store URI."""
    try:
        spec = raw_or_spec if isinstance(raw_or_spec, JobSpec) else parse_spec(raw_or_spec, source)
        kind = get_kind(spec.kind)
        if store and spec.store:  # --store wins, but the spec as written must still be valid
            check_store_uri(spec.store, "store")
        uri, where = resolve_store(store, spec)
        uri = check_store(uri, where)
        check_parallel(spec)
        directions = _resolve_directions(spec, uri)  # stored directions of ``interventions``: before any model work
        model = validation_model(spec)
        check_stage_split(spec, model)
        if directions:
            from interplab.analyses.directions import check_direction_sites

            check_direction_sites(directions, model, served=served_name(spec) is not None)
        kind.runner.validate(spec, model)
        check_context(kind, spec, model)
        chunk_ids = [str(c) for c in kind.runner.chunks(spec, model)]
        provenance_fn = getattr(kind.runner, "provenance", None)
        provenance = dict(provenance_fn(spec)) if provenance_fn is not None else {}
        provenance.update(service_provenance(model))  # a served model: which service, weights and user
        dataset = _dataset_hash(kind, spec, model, provenance)
    except (SpecError, SpecErrors) as exc:
        raise exc.with_source(source) if source and not getattr(exc, "source", "") else exc  # noqa: B904 - re-raised as itself, with its file name
    _check_chunk_ids(kind.name, chunk_ids)
    inputs = input_runs(provenance, [d.direction.run_id for d in directions])
    job = PreparedJob(spec, kind, chunk_ids, provenance, source, inputs=inputs, git=_git(source), dataset_hash=dataset)
    return job, uri


def _resolve_directions(spec: JobSpec, uri: str) -> list:
    """The spec's ``interventions`` resolved against its store (none for kinds without the field)."""
    if not getattr(spec, "interventions", None):
        return []
    from interplab.analyses.directions import resolve_spec_directions

    return resolve_spec_directions(spec, uri)


def input_runs(provenance: dict[str, Any], direction_runs: list[str]) -> list[str]:
    """The runs a job reads, recorded as its run's ``inputs`` (a retention sweep keeps them): the
    kind's ``provenance["inputs"]`` (e.g. a probe's ``activations_run``, a partition's
    ``capture_run``) and the runs the spec's ``interventions`` take directions from."""
    declared = provenance.get("inputs") or []
    if isinstance(declared, str) or not isinstance(declared, list | tuple):
        declared = [declared]
    return list(dict.fromkeys([*(str(r) for r in declared if r), *direction_runs]))


def _git(source: str) -> dict[str, Any] | None:
    """The git state of the spec file's repository (None for a spec not read from a file, or outside git)."""
    from interplab.store.provenance import git_state

    state = git_state(source) if source and os.path.isfile(source) else None
    return state.to_dict() if state is not None else None


def _dataset_hash(kind: JobKind, spec: JobSpec, model, provenance: dict[str, Any]) -> str | None:
    """sha256 of the job's prompt texts in order; else the data hash its kind recorded."""
    from interplab.store.provenance import dataset_hash_from, texts_hash

    texts = [text for _, text in job_prompts(kind, spec, model)]
    return texts_hash(texts) if texts else dataset_hash_from(provenance)


def job_prompts(kind: JobKind, spec: JobSpec, model) -> list[tuple[str, str]]:
    """``(field path, text)`` of every prompt the job runs: the runner's ``prompt_texts(spec, model)``
    if it has one, else the spec's ``prompt_texts()`` (capture) at ``prompts[i]`` / ``dataset[i]``."""
    declared = getattr(kind.runner, "prompt_texts", None)
    if callable(declared):
        return [(str(path), str(text)) for path, text in declared(spec, model)]
    texts = getattr(spec, "prompt_texts", None)
    if not callable(texts):
        return []
    where = "prompts" if getattr(spec, "prompts", None) is not None else "dataset"
    return [(f"{where}[{i}]", text) for i, text in enumerate(texts())]


def check_context(kind: JobKind, spec: JobSpec, model, batch: int = 256) -> None:
    """Every prompt, tokenised as the engine does, fits the model's context (``max_position_embeddings``)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return
    prompts = job_prompts(kind, spec, model)
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        lengths = model.tokenize([text for _, text in part]).lengths.tolist()
        for (path, text), n in zip(part, lengths):
            if n > limit:
                raise SpecError(
                    path,
                    f"the prompt is {n} tokens long; {spec.model} reads at most {limit} (its max_position_embeddings)",
                    text,
                    f"a prompt of at most {limit} tokens",
                )


def _check_chunk_ids(kind: str, chunk_ids: list[str]) -> None:
    from interplab.store import StoreError, layout

    if not chunk_ids:
        raise SpecError("(spec)", f"the {kind} job has nothing to do (no chunks)", [], "at least one chunk of work")
    keys = [chunk_key(c) for c in chunk_ids]
    if len(set(keys)) != len(keys):
        raise ValueError(f"job kind {kind!r} returned duplicate chunk ids: {chunk_ids}")
    for c in chunk_ids:
        try:
            layout.chunk_key(c)
        except StoreError as exc:
            raise ValueError(f"job kind {kind!r}: bad chunk id {c!r}: {exc}") from None


def chunk_key(chunk: str | int) -> str:
    """Canonical chunk key (``"3"``, ``"000003"`` and ``3`` are the same chunk)."""
    from interplab.store import layout

    return layout.chunk_key(layout.parse_chunk_key(chunk) if isinstance(chunk, str) else chunk)


def find_run(uri: str, run_id: str):
    """The store's record of ``run_id``, or None when the store or the run does not exist yet."""
    from interplab.store import StoreError, open_store

    try:
        store = open_store(uri, create=False)
    except StoreError:
        return None
    try:
        return store.run(run_id)
    except StoreError:
        return None


def check_resumable(job: PreparedJob, info) -> None:
    """A run may be continued only by the same kind, spec and data it began with."""
    path = f"run {info.run_id}"
    if info.kind != job.kind.name:
        raise SpecError("kind", f"{path} is a {info.kind} run", job.kind.name, info.kind)
    if info.spec is not None and info.spec != job.record:
        changed = sorted(k for k in set(info.spec) | set(job.record) if info.spec.get(k) != job.record.get(k))
        raise SpecError(
            changed[0] if changed else "(spec)",
            f"{path} was started with a different spec "
            f"(fields differ: {', '.join(changed)}); resume it with its own spec (interplab run --resume "
            f"{info.run_id}) or start a new run",
            job.record.get(changed[0]) if changed else None,
            repr(info.spec.get(changed[0])) if changed else "",
        )
    for key, value in job.provenance.items():
        if key in info.provenance and info.provenance[key] != value:
            raise SpecError(
                "(data)",
                f"{path}: {key} changed since the run began, so its chunks would not match",
                value,
                repr(info.provenance[key]),
            )


def _stored_run(run_id: str, store: str | None, option: str):
    from interplab.store import StoreError, open_store
    from interplab.store.fs import DEFAULT_STORE, STORE_ENV

    uri = store or os.environ.get(STORE_ENV) or DEFAULT_STORE
    try:
        opened = open_store(uri, create=False)
        info = opened.run(run_id)
    except StoreError as exc:
        raise SpecError(option, str(exc), run_id, "the id of a run in this store (interplab runs)") from None
    if info.spec is None:
        raise SpecError(option, "the run has no saved spec (it was not started by a job)", run_id, "a job's run id")
    return info, opened.uri


def saved_spec(run_id: str, store: str | None) -> dict[str, Any]:
    """The spec a run was started with (to re-run it exactly)."""
    return dict(_stored_run(run_id, store, "--rerun")[0].spec)


def saved_store(run_id: str, store: str | None) -> str:
    return _stored_run(run_id, store, "--rerun")[1]


def prepare_resume(run_id: str, store: str | None) -> tuple[PreparedJob, str, Any]:
    """Re-validate the spec a run was started with; return the job, the store URI and the run's record."""
    info, uri = _stored_run(run_id, store, "--resume")
    job, uri = prepare(dict(info.spec), f"run {run_id}", store=uri)
    check_resumable(job, info)
    return job, uri, info
