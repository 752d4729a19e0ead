"""The ``capture`` job kind: run a model over prompts and store the activations of some sites.

.. code-block:: yaml

    kind: capture
    model: smollm2-135m
    dataset: {builtin: ioi, limit: 64}      # or prompts: [...], or dataset: {path: prompts.jsonl}
    sites: [resid_post.10, z.9]
    positions: [-1]                         # or "all"
    batch_size: 16                          # one chunk = one batch

Chunk ``i`` holds prompts ``[i*batch_size, (i+1)*batch_size)``; its rows land in ``activations``
(``prompt_id`` is the index in the dataset) and ``prompts``.

**Interventions.** ``interventions: [{direction: {run_id, region | probe}, op: ablate | steer, ...}]``
(:mod:`interplab.analyses.directions`) apply stored directions in every forward pass, so the
captured activations are those of the intervened model (a site at or after an intervention shows
its effect; the intervened site itself is captured after it). The direction runs become the run's
``inputs``. Such a run reuses no rows, and the driver does not lend its rows to other captures
(:func:`interplab.jobs.execute.run_job`).

**Reuse.** When the driver found committed capture runs holding some of the needed rows (same
weights, ``dtype`` and ``store_dtype``; :mod:`interplab.jobs.reuse`), the run records them as its
``inputs`` and ``provenance.reuse_sources``. Each chunk then looks its prompts up in exactly those
runs: a prompt whose every site (at every needed position) is there is not run; the chunk references
the source files (``add_references``) and writes ``reused_rows`` (which source rows, under which of
its prompt ids) and the prompts' ``prompts`` rows; the other prompts run forward as one batch.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from interplab.analyses.directions import DirectionIntervention, check_direction_positions
from interplab.jobs import datasets, reuse
from interplab.jobs.errors import MISSING, SpecError, at_path, check_positions
from interplab.jobs.registry import JobSummary, register_kind
from interplab.jobs.spec import DatasetSpec, JobSpec

if TYPE_CHECKING:
    from collections.abc import Sequence

    from interplab.engine.backend import Backend
    from interplab.engine.interventions import Intervention
    from interplab.store.writer import RunWriter


class CaptureSpec(JobSpec):
    kind: Literal["capture"]
    prompts: list[str] | None = None
    dataset: DatasetSpec | None = None
    sites: list[str] = Field(min_length=1)
    positions: list[int] | Literal["all"] = Field(default="all", union_mode="left_to_right")
    store_dtype: Literal["float16", "float32"] = "float16"
    interventions: list[DirectionIntervention] = Field(default_factory=list)

    @field_validator("positions", mode="before")
    @classmethod
    def _positions(cls, value: Any) -> Any:
        if value == "all":
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("positions must be 'all' or a non-empty list of token positions (negative counts from the end)")
        for i, p in enumerate(value):
            if not isinstance(p, int) or isinstance(p, bool):
                raise ValueError(f"positions[{i}] = {p!r} is not an integer")
        if len(set(value)) != len(value):
            raise ValueError("positions must not repeat")
        return value

    def prompt_texts(self) -> list[str]:
        return _texts(self.model_dump_json(include={"prompts", "dataset"}))

    def engine_positions(self) -> list[int] | None:
        return None if self.positions == "all" else list(self.positions)


@lru_cache(maxsize=4)
def _texts(key: str) -> list[str]:
    """The prompt texts of a spec's ``{"prompts", "dataset"}`` (JSON), cached per worker."""
    source = json.loads(key)
    prompts, dataset = source.get("prompts"), source.get("dataset")
    if (prompts is None) == (dataset is None):
        raise SpecError(
            "prompts",
            "give the prompts: either 'prompts' (a list) or 'dataset' (builtin or path)",
            prompts if prompts is not None else MISSING,
            "prompts: [...] or dataset: {builtin: ioi} / {path: prompts.jsonl}",
        )
    if prompts is not None:
        return datasets.select_field(prompts, "prompt", "prompts")
    return DatasetSpec.model_validate(dataset).texts()


class CaptureRunner:
    """Runner of the ``capture`` kind (see :mod:`interplab.jobs.registry` for the protocol)."""

    def validate(self, spec: CaptureSpec, model) -> None:
        texts = spec.prompt_texts()
        where = "prompts" if spec.prompts is not None else "dataset"
        if not texts:
            raise SpecError(where, "no prompts", [], "at least one prompt")
        for i, site in enumerate(spec.sites):
            with at_path(f"sites[{i}]", site, "sites of this model, e.g. resid_pre.0 (list them: interplab sites MODEL)"):
                parsed = model.validate_site(site)
            if not parsed.kind.fixed_width:
                raise SpecError(
                    f"sites[{i}]",
                    "attention patterns are not stored by capture jobs (their width varies)",
                    site,
                    "resid_*, attn_out, mlp_out, head_out, z, q, k, v, mlp_post, embed, final, logits",
                )
        lengths = []
        for i, text in enumerate(texts):
            n = len(model.tokenizer(text, add_special_tokens=True)["input_ids"])
            if n == 0:
                raise SpecError(f"{where}[{i}]", "the prompt tokenizes to no tokens", text, "text with at least one token")
            lengths.append(n)
        if spec.positions != "all":
            check_positions("positions", spec.positions, lengths, where)
        check_direction_positions(spec, lengths, where)

    def chunks(self, spec: CaptureSpec, model) -> list[str]:
        n = len(spec.prompt_texts())
        return [f"{i:06d}" for i in range((n + spec.batch_size - 1) // spec.batch_size)]

    def run_chunk(self, spec: CaptureSpec, model: Backend, chunk_id: str, writer: RunWriter) -> None:
        index = int(chunk_id)
        n_chunks = len(self.chunks(spec, model))
        if spec.interventions:  # every prompt runs, with the stored directions applied
            from interplab.analyses.directions import spec_interventions

            first = index * spec.batch_size
            ids = list(range(first, min(first + spec.batch_size, len(spec.prompt_texts()))))
            _capture_prompts(spec, model, index, ids, writer, spec_interventions(spec, writer.store))
            return
        sources = _recorded_sources(writer)
        if sources:
            computed = _reuse_chunk(spec, model, index, writer, sources)
            if len(computed) < min(spec.batch_size, len(spec.prompt_texts()) - index * spec.batch_size):
                if computed:
                    _capture_prompts(spec, model, index, computed, writer)
                return
        model.capture(
            spec.prompt_texts(),
            spec.sites,
            writer,
            batch_size=spec.batch_size,
            positions=spec.engine_positions(),
            dtype=spec.store_dtype,
            skip_chunks=[i for i in range(n_chunks) if i != index],
        )

    def finalize(self, spec: CaptureSpec, model, writer) -> JobSummary:
        n = len(spec.prompt_texts())
        positions = "all positions" if spec.positions == "all" else f"positions {list(spec.positions)}"
        return JobSummary(
            lines=[f"captured {len(spec.sites)} site(s) x {n} prompt(s) at {positions} ({spec.store_dtype})"],
            sql=[
                "SELECT site, layer, count(*) AS n_rows, count(DISTINCT prompt_id) AS n_prompts "
                "FROM activations WHERE run_id = '{run_id}' GROUP BY site, layer ORDER BY site, layer",
                "SELECT prompt_id, position, token, site, layer FROM activations "
                "WHERE run_id = '{run_id}' ORDER BY prompt_id, position, site, layer LIMIT 10",
            ],
        )

    def content_fields(self, spec: CaptureSpec) -> dict[str, Any]:
        """What changes a capture's rows besides the weights and the prompts' token ids (the content
        key's other parts): the sites, positions, dtype and storage dtype, and any interventions."""
        fields = spec.model_dump(mode="json", include={"kind", "sites", "positions", "dtype", "store_dtype", "interventions"})
        if not fields["interventions"]:  # keys of captures without interventions stay as they were
            del fields["interventions"]
        return fields

    def provenance(self, spec: CaptureSpec) -> dict[str, Any]:
        texts = spec.prompt_texts()
        return {"n_prompts": len(texts), "prompts_sha256": datasets.fingerprint(texts)}


def _recorded_sources(writer: RunWriter) -> list[str]:
    """The runs the driver chose to reuse rows from (``provenance.reuse_sources`` of the run)."""
    sources = writer.store.run(writer.run_id).provenance.get(reuse.SOURCES_FIELD) or []
    return [str(s) for s in sources]


@lru_cache(maxsize=2)
def _coverage(store_uri: str, sources: tuple[str, ...], weights: str, spec_json: str) -> reuse.CaptureCoverage:
    from interplab.store import open_store

    spec = CaptureSpec.model_validate_json(spec_json)
    return reuse.capture_sources(open_store(store_uri, create=False), weights, spec, only=list(sources))


def _reuse_chunk(spec: CaptureSpec, model: Backend, index: int, writer: RunWriter, sources: list[str]) -> list[int]:
    """Reference the rows of chunk ``index`` that ``sources`` hold; return the prompt ids to compute."""
    import dataclasses

    import pyarrow as pa

    from interplab.engine.tokens import decode, encode
    from interplab.store import layout
    from interplab.store.reuse import REUSED_ROWS, REUSED_ROWS_SCHEMA

    coverage = _coverage(writer.store_uri, tuple(sources), model.weight_hash, spec.model_dump_json())
    first = index * spec.batch_size
    texts = spec.prompt_texts()[first : first + spec.batch_size]
    rows: dict[str, list[Any]] = {name: [] for name in REUSED_ROWS_SCHEMA.names}
    files: dict[str, Any] = {}
    prompts: dict[str, list[Any]] = {"prompt_id": [], "n_tokens": [], "token_ids": [], "tokens": []}
    computed = []
    for offset, text in enumerate(texts):
        prompt_id = first + offset
        ids = encode(model.tokenizer, text)
        found = coverage.lookup(ids, spec.sites, spec.positions)
        if found is None:
            computed.append(prompt_id)
            continue
        positions = reuse.absolute_positions(spec.positions, len(ids))
        for site, (run_id, source_prompt) in found.sites.items():
            kind, layer, _ = reuse.parse_site(site)
            for position in positions:
                for name, value in zip(REUSED_ROWS_SCHEMA.names, (run_id, kind, layer, source_prompt, prompt_id, position)):
                    rows[name].append(value)
            for entry in coverage.entries(run_id, site):
                files[entry.path] = dataclasses.replace(entry, source_run=run_id)
        prompts["prompt_id"].append(prompt_id)
        prompts["n_tokens"].append(len(ids))
        prompts["token_ids"].append(ids)
        prompts["tokens"].append([decode(model.tokenizer, [t]) for t in ids])
    if prompts["prompt_id"]:
        writer.write_table(REUSED_ROWS, pa.table(rows, schema=REUSED_ROWS_SCHEMA), chunk=index)
        writer.write_table(layout.PROMPTS, pa.table(prompts), chunk=f"{layout.chunk_key(index)}-reused")
        writer.add_references(index, list(files.values()))
    return computed


def _capture_prompts(
    spec: CaptureSpec,
    model: Backend,
    index: int,
    prompt_ids: list[int],
    writer: RunWriter,
    interventions: Sequence[Intervention] = (),
) -> None:
    """Run only ``prompt_ids`` (one batch, with ``interventions``) and write them as chunk ``index`` of the run."""
    from interplab.engine.stream import CaptureChunk
    from interplab.engine.tokens import decode

    texts = spec.prompt_texts()
    result = model.run(
        [texts[i] for i in prompt_ids],
        capture=spec.sites,
        positions=spec.engine_positions(),
        interventions=interventions,
        logits="none",
    )
    batch = result.batch
    chunk = CaptureChunk(
        index=index,
        prompt_ids=list(prompt_ids),
        token_ids=batch.input_ids.cpu(),
        lengths=batch.lengths.tolist(),
        tokens=[
            [decode(model.tokenizer, [int(t)]) for t in batch.input_ids[i, : int(batch.lengths[i])]] for i in range(batch.size)
        ],
        positions=result.cache.positions,
        valid=result.cache.valid,
        acts={site: value.to("cpu") for site, value in result.cache.items()},
    )
    writer.write_capture_chunk(chunk, dtype=spec.store_dtype)


register_kind("capture", CaptureSpec, CaptureRunner())
