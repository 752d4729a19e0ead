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
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from interplab.jobs import datasets
from interplab.jobs.errors import MISSING, SpecError, at_path
from interplab.jobs.registry import JobSummary, register_kind
from interplab.jobs.spec import DatasetSpec, JobSpec

if TYPE_CHECKING:
    from interplab.engine.backend import Backend
    from interplab.store.writer import RunWriter


class CaptureSpec(JobSpec):
    kind: Literal["capture"]
    prompts: list[str] | None = None
    dataset: DatasetSpec | None = None
    sites: list[str] = Field(min_length=1)
    positions: list[int] | Literal["all"] = Field(default="all", union_mode="left_to_right")
    store_dtype: Literal["float16", "float32"] = "float16"

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
            shortest = min(range(len(lengths)), key=lengths.__getitem__)
            n = lengths[shortest]
            for j, p in enumerate(spec.positions):
                if not -n <= p < n:
                    raise SpecError(
                        f"positions[{j}]",
                        f"out of range for {where}[{shortest}], which has {n} tokens",
                        p,
                        f"{-n}..{n - 1} (negative counts from each prompt's end)",
                    )

    def chunks(self, spec: CaptureSpec, model) -> list[str]:
        n = len(spec.prompt_texts())
        return [f"{i:06d}" for i in range((n + spec.batch_size - 1) // spec.batch_size)]

    def run_chunk(self, spec: CaptureSpec, model: Backend, chunk_id: str, writer: RunWriter) -> None:
        index = int(chunk_id)
        n_chunks = len(self.chunks(spec, model))
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

    def provenance(self, spec: CaptureSpec) -> dict[str, Any]:
        texts = spec.prompt_texts()
        return {"n_prompts": len(texts), "prompts_sha256": datasets.fingerprint(texts)}


register_kind("capture", CaptureSpec, CaptureRunner())
