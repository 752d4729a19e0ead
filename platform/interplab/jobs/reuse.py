"""Reuse of results already computed: a job's content key, and the lookup before a job starts.

**Content key.** ``sha256`` (32 hex digits) of the JSON of::

    {"v": 1, "weights": <weights hash>, "kind": <kind>, "fields": <result fields>, "tokens": [[ids], ...]}

* ``weights``: :func:`interplab.models.weights.spec_weight_hash` — the full content of the weight
  files and ``config.json``, cached by file (path, size, mtime), so no model is loaded.
* ``fields``: the spec fields that change results. A kind declares them with an optional runner
  method ``content_fields(spec) -> dict``; by default they are every field of the spec except
  :data:`NOT_RESULT_FIELDS` (where results go and how the work is cut and placed: ``store``,
  ``batch_size``, ``workers``, ``resources``, ``retries``, ``parallel``, ``device``, ``description``,
  tags, owner, team, ``model`` — the weights hash stands for it), plus the kind's ``provenance(spec)``
  (data hashes) and the hash of any ``dataset.path`` file.
* ``tokens``: the token ids of every prompt the job runs (:func:`interplab.jobs.prepare.job_prompts`),
  tokenised as the engine does, with only the tokenizer loaded.

**Lookup** (:func:`find_reusable`): the committed runs with the key in the job's store, then in every
store of the catalog (``~/.config/interplab/stores.toml``) when there is one, through the
content-key index (:mod:`interplab.store.reuse`).

**Capture jobs** also reuse rows: :func:`capture_sources` picks the committed capture runs (same
weights hash, ``dtype`` and ``store_dtype``) that hold some of the needed (prompt tokens, site,
position) rows; :class:`CaptureCoverage` says, per prompt, which run holds each site's rows. The
capture runner commits a run that references those rows (``interplab.jobs.capture``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from interplab.jobs.prepare import PreparedJob
    from interplab.store import RunInfo, Store

KEY_VERSION = 1
NOT_RESULT_FIELDS = frozenset(
    {
        "description",
        "store",
        "batch_size",
        "workers",
        "resources",
        "retries",
        "parallel",
        "device",
        "model",
        "service",
        "tags",
        "owner",
        "team",
        "user",
    }
)
SOURCES_FIELD = "reuse_sources"  # provenance: the runs whose rows a capture run references


@lru_cache(maxsize=4)
def load_tokenizer(model: str) -> Any:
    """The tokenizer of the model a spec names, without its weights."""
    from interplab.models.loading import resolve_source
    from interplab.models.tiny import TINY_PREFIX, tiny_tokenizer

    if model.startswith(TINY_PREFIX):
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_source(model))


def result_fields(job: PreparedJob) -> dict[str, Any]:
    """The spec fields (and data hashes) that change the job's results (see the module doc)."""
    declared = getattr(job.kind.runner, "content_fields", None)
    if callable(declared):
        return dict(declared(job.spec))
    record = job.record
    fields: dict[str, Any] = {k: v for k, v in record.items() if k not in NOT_RESULT_FIELDS}
    provenance = getattr(job.kind.runner, "provenance", None)
    if callable(provenance):
        fields["__data__"] = dict(provenance(job.spec))
    dataset = record.get("dataset")
    if isinstance(dataset, dict) and isinstance(dataset.get("path"), str) and os.path.isfile(dataset["path"]):
        with open(dataset["path"], "rb") as handle:
            fields["__dataset_file__"] = hashlib.sha256(handle.read()).hexdigest()
    return fields


def prompt_tokens(job: PreparedJob, tokenizer: Any) -> list[list[int]]:
    """The token ids of every prompt of the job, as the engine tokenises them."""
    from interplab.engine.tokens import encode
    from interplab.jobs.prepare import job_prompts

    holder = _TokenizerOnly(tokenizer)
    return [encode(tokenizer, text) for _, text in job_prompts(job.kind, job.spec, holder)]


@dataclass(frozen=True)
class _TokenizerOnly:
    """What ``job_prompts`` may ask a model for when only the tokenizer is loaded."""

    tokenizer: Any


def content_key(job: PreparedJob, *, weights: str | None = None, tokens: list[list[int]] | None = None) -> str | None:
    """The job's content key, or None when it has none (a served model: its weights are not here)."""
    from interplab.jobs.model import served_name
    from interplab.models.weights import spec_weight_hash

    if served_name(job.spec) is not None:
        return None
    if weights is None:
        weights = spec_weight_hash(job.spec.model, job.spec.seed)
    if tokens is None:
        tokens = prompt_tokens(job, load_tokenizer(job.spec.model))
    body = {"v": KEY_VERSION, "weights": weights, "kind": job.kind.name, "fields": result_fields(job), "tokens": tokens}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Reusable:
    """A committed run with the job's content key."""

    run: RunInfo
    store: str

    def describe(self) -> str:
        owner = getattr(self.run, "owner", None) or self.run.user or "?"
        return f"run {self.run.run_id} in {self.store} (owner {owner}, committed {self.run.committed_at})"


def readable_stores(store_uri: str) -> list[Store]:
    """The job's store, then every store of the catalog (when there is a catalog file)."""
    from interplab.store import StoreError, open_store

    out: list[Store] = []
    try:
        out.append(open_store(store_uri, create=False))
    except StoreError:
        pass  # a new store: nothing to reuse there yet
    try:
        from interplab.store.catalog import CATALOG_ENV, catalog_path, open_catalog

        if os.environ.get(CATALOG_ENV) or os.path.exists(catalog_path()):
            seen = {s.uri for s in out}
            out.extend(entry.store for entry in open_catalog().stores if entry.store.uri not in seen)
    except (ImportError, StoreError):
        pass  # no catalog: the job's store only
    return out


def find_reusable(key: str, stores: Sequence[Store]) -> Reusable | None:
    """The newest committed run with ``key``, in the first store that has one."""
    from interplab.store.reuse import runs_with_key

    for store in stores:
        found = runs_with_key(store, key)
        if found:
            return Reusable(found[0], store.uri)
    return None


# -- capture-level reuse ------------------------------------------------------------------------


def parse_site(site: str) -> tuple[str, int | None, int | None]:
    """``"z.1.3"`` → ``("z", 1, 3)``; ``"resid_post.2"`` → ``("resid_post", 2, None)``."""
    parts = site.split(".")
    layer = int(parts[1]) if len(parts) > 1 else None
    head = int(parts[2]) if len(parts) > 2 else None
    return parts[0], layer, head


def absolute_positions(positions: Any, n: int) -> tuple[int, ...]:
    """The token positions a spec's ``positions`` captures in a prompt of ``n`` tokens."""
    if positions == "all" or positions is None:
        return tuple(range(n))
    return tuple(sorted({p if p >= 0 else n + p for p in positions}))


@dataclass
class _Source:
    """One committed capture run: its own prompts (by token ids), sites and positions."""

    run: RunInfo
    prompts: dict[tuple[int, ...], int]
    sites: frozenset[str]
    positions: Any


@dataclass
class PromptReuse:
    """Where the rows of one prompt come from: per site, (source run, its prompt id)."""

    sites: dict[str, tuple[str, int]] = field(default_factory=dict)


class CaptureCoverage:
    """Which needed (prompt tokens, site, position) rows committed capture runs already hold."""

    def __init__(self, sources: list[_Source]):
        self.sources = sources

    @property
    def run_ids(self) -> list[str]:
        return [s.run.run_id for s in self.sources]

    def lookup(self, tokens: Sequence[int], sites: Sequence[str], positions: Any) -> PromptReuse | None:
        """Where every site's rows of this prompt are (first source in order), or None if any is missing."""
        key = tuple(tokens)
        needed = set(absolute_positions(positions, len(key)))
        out = PromptReuse()
        for site in sites:
            for source in self.sources:
                prompt = source.prompts.get(key)
                if prompt is None or site not in source.sites:
                    continue
                if needed <= set(absolute_positions(source.positions, len(key))):
                    out.sites[site] = (source.run.run_id, prompt)
                    break
            else:
                return None
        return out

    def entries(self, run_id: str, site: str) -> list[Any]:
        """The activation files of ``run_id`` (its own) that hold ``site``."""
        from interplab.store import layout

        kind, layer, head = parse_site(site)
        source = next(s for s in self.sources if s.run.run_id == run_id)
        return [
            e
            for e in source.run.files
            if e.table == layout.ACTIVATIONS and e.source_run is None and e.site == kind and e.layer == layer and e.head == head
        ]


def _own_prompts(store: Store, run: RunInfo) -> dict[tuple[int, ...], int]:
    """Token ids → prompt id of the prompts ``run`` computed itself (not those it references)."""
    import pyarrow.parquet as pq

    from interplab.store import layout, reuse

    loc = store.location
    borrowed = set(reuse.reuse_map(loc, run)["prompt_id"].to_pylist())
    out: dict[tuple[int, ...], int] = {}
    for entry in run.files:
        if entry.table != layout.PROMPTS:
            continue
        with loc.fs.open_input_file(loc.path(entry.path)) as f:
            table = pq.read_table(f, columns=["prompt_id", "token_ids"])
        for pid, ids in zip(table["prompt_id"].to_pylist(), table["token_ids"].to_pylist()):
            if pid not in borrowed:
                out.setdefault(tuple(ids), pid)
    return out


def capture_sources(
    store: Store,
    weights: str,
    spec: Any,
    *,
    only: Sequence[str] | None = None,
) -> CaptureCoverage:
    """The committed capture runs of ``store`` whose rows ``spec`` (a capture spec) could reuse:
    same weights hash, ``dtype`` and ``store_dtype``, at least one of its sites, and neither captured
    under ``interventions`` (an intervened model's rows are lent to no other capture). ``only`` restricts
    them to those run ids, in that order (what a run recorded as its sources); otherwise newest first."""
    runs = {r.run_id: r for r in store.runs("committed") if r.kind == "capture"}
    if only is not None:
        ordered = [runs[r] for r in only if r in runs]
    else:
        ordered = sorted(runs.values(), key=lambda r: (r.committed_at or "", r.run_id), reverse=True)
    wanted = set(spec.sites)
    sources: list[_Source] = []
    if getattr(spec, "interventions", None):  # rows of an intervened model are its own (whole runs: content key)
        return CaptureCoverage(sources)
    for run in ordered:
        other = run.spec or {}
        if run.weight_hash != weights or other.get("dtype") != spec.dtype or other.get("interventions"):
            continue
        if other.get("store_dtype", "float16") != spec.store_dtype or not wanted & set(other.get("sites") or []):
            continue
        sources.append(_Source(run, _own_prompts(store, run), frozenset(other.get("sites") or []), other.get("positions", "all")))
    return CaptureCoverage(sources)


@dataclass(frozen=True)
class CapturePlan:
    """What a capture job reuses: the runs (in lookup order) and how many prompts they cover."""

    sources: list[str]
    n_reused: int
    n_prompts: int


def plan_capture(job: PreparedJob, store: Store, weights: str, tokens: list[list[int]]) -> CapturePlan:
    """The sources a capture job will reference (only runs that cover at least one prompt)."""
    spec = job.spec
    coverage = capture_sources(store, weights, spec)
    used: list[str] = []
    n_reused = 0
    sites = list(getattr(spec, "sites", []))
    for ids in tokens:
        found = coverage.lookup(ids, sites, getattr(spec, "positions", "all"))
        if found is None:
            continue
        n_reused += 1
        for run_id, _ in found.sites.values():
            if run_id not in used:
                used.append(run_id)
    order = [r for r in coverage.run_ids if r in used]  # keep lookup order: the worker repeats it
    return CapturePlan(order, n_reused, len(tokens))


# -- the driver's step before a job starts --------------------------------------------------------


@dataclass(frozen=True)
class ReuseStep:
    """What :func:`before_run` found: a whole run to report, and/or a capture plan."""

    found: Reusable | None = None
    plan: CapturePlan | None = None

    @property
    def complete(self) -> bool:
        """Every prompt's rows are in committed runs: no forward pass at all."""
        return self.plan is not None and self.plan.n_reused == self.plan.n_prompts


def before_run(job: PreparedJob, store_uri: str, *, recompute: bool = False, lookup: bool = True, echo: Any = print) -> ReuseStep:
    """Compute the job's content key and record it (``job.provenance["content_key"]``); find the
    committed run to report instead of running, if any store has one (and not ``recompute``).

    Otherwise, for a capture job, choose the runs whose rows it will reference
    (``job.provenance["reuse_sources"]``, also the run's ``inputs``). ``lookup=False`` (a run id
    given by the caller) skips the search for a whole run. Loads the tokenizer only."""
    from interplab.models.weights import spec_weight_hash
    from interplab.store.reuse import CONTENT_KEY

    if content_key_unavailable(job):
        return ReuseStep()
    try:
        weights = spec_weight_hash(job.spec.model, job.spec.seed)
        tokens = prompt_tokens(job, load_tokenizer(job.spec.model))
        key = content_key(job, weights=weights, tokens=tokens)
    except Exception as exc:  # noqa: BLE001 - e.g. a plugin kind whose prompts need the whole model
        echo(f"no content key for this job ({type(exc).__name__}: {exc}); it is run without reuse")
        return ReuseStep()
    if key is None:
        return ReuseStep()
    job.provenance[CONTENT_KEY] = key
    if recompute:
        echo(f"--recompute: not looking for committed runs with content key {key}")
        return ReuseStep()
    stores = readable_stores(store_uri)
    found = find_reusable(key, stores) if lookup else None  # a run named by --run-id is made, not looked up
    if found is not None:
        return ReuseStep(found=found)
    if job.kind.name == "capture" and stores and stores[0].uri == _uri(store_uri):
        plan = plan_capture(job, stores[0], weights, tokens)
        if plan.sources:
            job.provenance[SOURCES_FIELD] = plan.sources
            echo(
                f"reusing the rows of {plan.n_reused} of {plan.n_prompts} prompt(s) from run(s) {', '.join(plan.sources)}; "
                f"computing {plan.n_prompts - plan.n_reused}"
            )
            return ReuseStep(plan=plan)
    return ReuseStep()


def content_key_unavailable(job: PreparedJob) -> bool:
    """A served model (its weights are not here): no content key, no reuse."""
    from interplab.jobs.model import served_name

    return served_name(job.spec) is not None


def _uri(store_uri: str) -> str:
    from interplab.store import fs

    return fs.resolve(store_uri).uri


# -- the fast path: before the spec is validated against the model --------------------------------


def quick_lookup(raw: dict[str, Any], store: str | None) -> Reusable | None:
    """The committed run with the content key of the spec ``raw``, found before the spec is checked
    against the model: pydantic validation, the weights hash (cached) and the prompts' token ids
    through the ``tokenizers`` library, so neither torch nor transformers is imported. The key is
    the one :func:`before_run` computes; when anything here cannot be done (a served model, a
    tokenizer without ``tokenizer.json``, a bad spec) it returns None and the full path runs (and
    reports any problem). A job whose results exist is not validated further: the run that holds
    them was."""
    try:
        from interplab.jobs.prepare import resolve_store
        from interplab.jobs.registry import parse_spec

        uri, _ = resolve_store(store, parse_spec(raw))
        stores = readable_stores(uri)
        key = fast_content_key(raw) if stores else None
        return find_reusable(key, stores) if key is not None else None
    except Exception:  # noqa: BLE001 - an optimisation only: the full path decides and reports
        return None


def fast_content_key(raw: dict[str, Any]) -> str | None:
    """:func:`content_key` of the spec ``raw`` without torch or transformers (see :func:`quick_lookup`);
    None when the tokenizer cannot be read that way. Raises what parsing the spec raises."""
    from interplab.jobs.prepare import PreparedJob, job_prompts
    from interplab.jobs.registry import get_kind, parse_spec
    from interplab.models.weights import spec_weight_hash

    spec = parse_spec(raw)
    kind = get_kind(spec.kind)
    job = PreparedJob(spec, kind, [], {}, "")
    if content_key_unavailable(job):
        return None
    tokenizer = _fast_tokenizer(spec.model)
    if tokenizer is None:
        return None
    texts = [text for _, text in job_prompts(kind, spec, _TokenizerOnly(tokenizer))]
    tokens = [list(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=True)]
    return content_key(job, weights=spec_weight_hash(spec.model, spec.seed), tokens=tokens)


def _fast_tokenizer(model: str) -> Any:
    """The model's tokenizer as a ``tokenizers.Tokenizer`` (no transformers), or None."""
    from pathlib import Path

    from tokenizers import Tokenizer

    from interplab.models.loading import resolve_source
    from interplab.models.tiny import TINY_PREFIX

    if model.startswith(TINY_PREFIX):
        return _tiny_backend()
    source = resolve_source(model)
    path = Path(source) / "tokenizer.json" if isinstance(source, Path) else None
    return Tokenizer.from_file(str(path)) if path is not None and path.is_file() else None


@lru_cache(maxsize=1)
def _tiny_backend() -> Any:
    """The backend of :func:`interplab.models.tiny.tiny_tokenizer` (same vocabulary and pre-tokenizer,
    no post-processor: no special tokens are added), built without transformers."""
    from interplab.models.tiny import word_level_tokenizer

    return word_level_tokenizer()


# -- a job whose every row is reused: references only, here ---------------------------------------


@dataclass(frozen=True)
class _TokenizerModel:
    """What a capture chunk whose prompts are all reused asks of its model: no weights."""

    name: str
    tokenizer: Any
    weight_hash: str


class ReferenceWorkers:
    """The driver's worker interface (``info``, ``attach``, ``run``, ``finalize``, ``kill``) for a job
    whose every prompt's rows are in committed runs (:attr:`ReuseStep.complete`): the chunks only
    write references, in this process, so no Ray is started and no model loaded."""

    def __init__(self, job: PreparedJob, echo: Any) -> None:
        import socket

        from interplab.models.weights import spec_weight_hash

        self._job = job
        weights = spec_weight_hash(job.spec.model, job.spec.seed)
        self._model: Any = _TokenizerModel(job.spec.model, load_tokenizer(job.spec.model), weights)  # not a Backend: no forwards
        self._writer: Any = None
        self.info = {
            "name": job.spec.model,
            "weight_hash": weights,
            "device": "none (every row reused)",
            "host": socket.gethostname(),
        }
        echo("every prompt's rows are in committed runs: writing references only (no model load)")

    def attach(self, store_uri: str, run_id: str) -> None:
        from interplab.store import open_store
        from interplab.store.writer import RunWriter

        self._writer = RunWriter(open_store(store_uri, create=False), run_id)

    def run(self, chunk_ids: list[str], progress: Any, check: Any) -> int:
        from interplab.jobs.errors import JobError
        from interplab.jobs.worker import JOB_CHUNKS_TABLE

        for chunk in chunk_ids:
            check()
            try:
                self._job.kind.runner.run_chunk(self._job.spec, self._model, chunk, self._writer)
            except Exception as exc:  # noqa: BLE001 - reported as a job error, like a worker's
                raise JobError(f"chunk {chunk} failed: {type(exc).__name__}: {exc}", chunk=chunk) from exc
            self._writer.finish_chunk(JOB_CHUNKS_TABLE, chunk, [])
            progress.update(1)
        return len(chunk_ids)

    def finalize(self) -> Any:
        return self._job.kind.runner.finalize(self._job.spec, self._model, self._writer)

    def kill(self) -> None:
        pass


@contextmanager
def references_only() -> Iterator[str]:
    """What ``run_job`` enters instead of a Ray session when :attr:`ReuseStep.complete`."""
    yield "this process (no Ray started: every row is in committed runs)"
