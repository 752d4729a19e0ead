"""The ``attribution`` job kind: which prompt tokens does a target completion depend on?

.. code-block:: yaml

    kind: attribution
    model: smollm2-135m
    prompts:
      - prompt: "The Eiffel Tower is located in the city of"
        target: " Paris"
    method: both              # hipe | itp | both
    unit: token               # token | word
    perturbation: mean        # baseline | zero | mean | delete
    baseline_token: null      # the replacement of perturbation 'baseline' (default: pad, else EOS)
    hipe: {first_window: null, overlap: 0.5, threshold: mid, min_effect: 0.001, keep: drop}

``dataset: {name: facts, n: 4}`` (or ``ioi``: the clean prompt and its answer) replaces ``prompts``.
One chunk per prompt: its per-token rows land in ``attributions``, its log-prob and cost (forwards,
passes, rounds) in ``attribution_summary``; the prompts' tokens in ``prompts``.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field, NonNegativeFloat, PositiveInt, field_validator, model_validator

from interplab.analyses.attribution.driver import Attribution, HipeConfig, attribute, default_max_rows
from interplab.analyses.attribution.inputs import build_task
from interplab.jobs.errors import SpecError, at_path
from interplab.jobs.registry import JobSummary
from interplab.jobs.spec import JobSpec, StrictModel

ATTRIBUTIONS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("method", pa.string()),
        ("position", pa.int32()),
        ("token_id", pa.int64()),
        ("token", pa.string()),
        ("unit", pa.int32()),
        ("attribution", pa.float64()),
        ("window", pa.int32()),
        ("level", pa.int32()),
    ]
)
SUMMARY_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("method", pa.string()),
        ("prompt", pa.string()),
        ("target", pa.string()),
        ("perturbation", pa.string()),
        ("n_tokens", pa.int32()),
        ("n_units", pa.int32()),
        ("base_logprob", pa.float64()),
        ("forwards", pa.int64()),
        ("passes", pa.int64()),
        ("rounds", pa.int64()),
        ("seconds", pa.float64()),
    ]
)


class AttributionPrompt(StrictModel):
    prompt: str = Field(min_length=1)
    target: str = Field(min_length=1)


class AttributionDataset(StrictModel):
    """A built-in task's clean prompts with their answers as targets."""

    name: Literal["facts", "ioi"]
    n: PositiveInt = 4
    seed: int = 0


class HipeOptions(StrictModel):
    first_window: PositiveInt | None = None
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    threshold: float | str = Field(default="mid", union_mode="left_to_right")
    min_effect: NonNegativeFloat = 1e-3
    keep: Literal["drop", "mean"] = "drop"

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: float | str) -> float | str:
        if isinstance(value, str) and value != "mid":
            raise ValueError(f"threshold must be 'mid' (the mid-range of the estimates) or a drop in nats, got {value!r}")
        return value

    def config(self) -> HipeConfig:
        threshold = None if self.threshold == "mid" else float(self.threshold)
        return HipeConfig(self.first_window, self.overlap, threshold, self.min_effect, self.keep)


class AttributionSpec(JobSpec):
    kind: Literal["attribution"]
    prompts: list[AttributionPrompt] | None = None
    dataset: AttributionDataset | None = None
    method: Literal["hipe", "itp", "both"] = "both"
    unit: Literal["token", "word"] = "token"
    perturbation: Literal["baseline", "zero", "mean", "delete"] = "mean"
    baseline_token: str | None = None
    hipe: HipeOptions = HipeOptions()
    batch_rows: PositiveInt | None = None
    memory_mb: PositiveInt = 1024

    @model_validator(mode="after")
    def _check(self) -> AttributionSpec:
        if (self.prompts is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'prompts' (a list of prompt/target) or 'dataset' ({name: facts | ioi, n})")
        if self.prompts is not None and not self.prompts:
            raise ValueError("'prompts' is empty: give at least one {prompt, target}")
        if self.baseline_token is not None and self.perturbation != "baseline":
            raise ValueError(f"baseline_token is only used by perturbation 'baseline', not {self.perturbation!r}")
        return self

    def methods(self) -> list[Literal["itp", "hipe"]]:
        return ["itp", "hipe"] if self.method == "both" else [self.method]


def spec_prompts(spec: AttributionSpec, tokenizer) -> list[tuple[str, str]]:
    """The (prompt, target) pairs of ``spec``."""
    if spec.prompts is not None:
        return [(p.prompt, p.target) for p in spec.prompts]
    data = spec.dataset
    if data is None:  # the spec's validator requires one source
        raise SpecError("dataset", "give exactly one of 'prompts' or 'dataset'", None)
    from interplab.analyses.tasks import facts_pairs, ioi_pairs

    with at_path("dataset", data.model_dump(exclude_defaults=True)):
        pairs = (
            facts_pairs(tokenizer, data.n, seed=data.seed)
            if data.name == "facts"
            else ioi_pairs(tokenizer, data.n, seed=data.seed)
        )
    return [(p.clean, p.answer) for p in pairs]


def baseline_id(spec: AttributionSpec, tokenizer) -> int | None:
    from interplab.engine.tokens import pad_id, single_token

    if spec.perturbation != "baseline":
        return None
    if spec.baseline_token is None:
        return pad_id(tokenizer)
    with at_path("baseline_token", spec.baseline_token, "a single token, e.g. ' the'"):
        return single_token(tokenizer, spec.baseline_token, what="baseline_token")


class AttributionRunner:
    """Runner of the ``attribution`` kind (protocol: :mod:`interplab.jobs.registry`)."""

    def validate(self, spec: AttributionSpec, model) -> None:
        where = "prompts" if spec.prompts is not None else "dataset"
        pairs = spec_prompts(spec, model.tokenizer)
        for i, (prompt, target) in enumerate(pairs):
            with at_path(f"{where}[{i}]", {"prompt": prompt, "target": target}, "a prompt and a non-empty target"):
                build_task(model.tokenizer, prompt, target, spec.unit)
        baseline_id(spec, model.tokenizer)
        if spec.perturbation in ("zero", "mean"):
            with at_path("perturbation", spec.perturbation):
                model.validate_site("embed")

    def chunks(self, spec: AttributionSpec, model) -> list[str]:
        return [f"prompt-{i}" for i in range(len(spec_prompts(spec, model.tokenizer)))]

    def run_chunk(self, spec: AttributionSpec, model, chunk_id: str, writer) -> None:
        index = int(chunk_id.removeprefix("prompt-"))
        results = run_prompt(spec, model, index)
        rows = [row for r in results for row in r.token_rows(index)]
        writer.write_table("attributions", pa.Table.from_pylist(rows, schema=ATTRIBUTIONS_SCHEMA), chunk=chunk_id)
        summary = [r.summary_row(index) for r in results]
        writer.write_table("attribution_summary", pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA), chunk=chunk_id)

    def finalize(self, spec: AttributionSpec, model, writer) -> JobSummary:
        rows = []
        for i, (prompt, target) in enumerate(spec_prompts(spec, model.tokenizer)):
            task = build_task(model.tokenizer, prompt, target, spec.unit)
            ids = list(task.prompt_ids)
            rows.append({"prompt_id": i, "n_tokens": len(ids), "token_ids": ids, "tokens": list(task.pieces)})
        writer.write_table("prompts", pa.Table.from_pylist(rows), chunk="prompts")
        return JobSummary(
            lines=[
                f"{spec.method} attribution ({spec.perturbation} perturbation, by {spec.unit}) of {len(rows)} prompt(s)",
                "picture: interplab plot {run_id} -o attribution.png",
            ],
            sql=[
                "SELECT prompt_id, method, n_units, forwards, rounds, round(base_logprob, 3) AS base_logprob "
                "FROM attribution_summary WHERE run_id = '{run_id}' ORDER BY prompt_id, method",
                "SELECT prompt_id, method, position, token, round(attribution, 3) AS attribution FROM attributions "
                "WHERE run_id = '{run_id}' ORDER BY attribution DESC NULLS LAST LIMIT 10",
            ],
        )

    def provenance(self, spec: AttributionSpec) -> dict:
        return {"methods": spec.methods(), "perturbation": spec.perturbation, "unit": spec.unit}


def run_prompt(spec: AttributionSpec, model, index: int) -> list[Attribution]:
    """Every method of ``spec`` on prompt ``index``."""
    prompt, target = spec_prompts(spec, model.tokenizer)[index]
    task = build_task(model.tokenizer, prompt, target, spec.unit)
    rows = spec.batch_rows or default_max_rows(model, task.n_tokens, len(task.target_ids), spec.memory_mb)
    return [
        attribute(
            model,
            task,
            method=method,
            perturbation=spec.perturbation,
            baseline_id=baseline_id(spec, model.tokenizer),
            max_rows=rows,
            config=spec.hipe.config(),
        )
        for method in spec.methods()
    ]
