"""The ``patching`` job kind.

.. code-block:: yaml

    kind: patching
    model: smollm2-135m
    prompts:
      - clean: "When Mary and John went to the store, John gave a drink to"
        corrupted: "When Mary and John went to the store, Mary gave a drink to"
        answer: " Mary"
        wrong: " John"
    sweep: resid_pre          # or a list; or {site: head_out, by: [layer, head]}; every_block; every_head
    direction: denoise        # denoise | noise
    method: exact             # exact | atp | both
    metric: logit_diff        # logit_diff | prob | logprob | kl | registered custom metrics

``interventions: [{direction: {run_id, region | probe}, op: ablate | steer, ...}]`` apply stored
directions (:mod:`interplab.analyses.directions`) as background interventions in every forward pass:
clean, corrupted and patched runs alike (:mod:`.driver`). The direction runs become the run's ``inputs``.

``dataset: {name: ioi, n: 64, seed: 0, corruption: abc}`` (or ``{name: facts, n: 16}``, or
``{path: pairs.jsonl}``) replaces ``prompts``. One chunk per sweep: its rows land in ``patching``;
clean/corrupted baselines and exact-vs-AtP correlations in ``baselines``; the clean prompts'
tokens in ``prompts`` (for heatmap labels).
"""

from __future__ import annotations

import json
import weakref
from functools import lru_cache
from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from interplab.analyses.directions import DirectionIntervention, check_direction_positions, spec_interventions
from interplab.analyses.metrics import metric_names
from interplab.analyses.patching.driver import activation_patching, layer_work
from interplab.analyses.patching.result import PatchingResult, baselines_table
from interplab.analyses.patching.sweeps import SweepError, parse_sweeps
from interplab.analyses.tasks import PairSet, PromptPair, TaskError, facts_pairs, ioi_pairs, load_pairs
from interplab.analyses.tasks.pairs import pairs_from_records
from interplab.engine.work import LayerWork
from interplab.jobs.errors import SpecError, at_path
from interplab.jobs.registry import JobSummary
from interplab.jobs.spec import JobSpec, StrictModel


class PairPrompt(StrictModel):
    clean: str = Field(min_length=1)
    corrupted: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    wrong: str = Field(min_length=1)


class PairDataset(StrictModel):
    """A built-in task (``name: ioi`` / ``facts``) or a file of pairs (``path``: .yaml/.jsonl)."""

    name: Literal["ioi", "facts"] | None = None
    path: str | None = None
    n: PositiveInt = 64
    seed: int = 0
    corruption: Literal["abc", "s2_random", "flip"] = "abc"
    order: Literal["BABA", "ABBA", "mixed"] = "mixed"
    template: int | Literal["all"] = Field(default=0, union_mode="left_to_right")

    @model_validator(mode="after")
    def _one_source(self) -> PairDataset:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of 'name' (ioi, facts) or 'path' (a .yaml/.jsonl file of pairs)")
        return self


class PairTaskSpec(JobSpec):
    """Fields every analysis over clean/corrupted prompt pairs shares (patching, circuits)."""

    prompts: list[PairPrompt] | None = None
    dataset: PairDataset | None = None
    metric: str = "logit_diff"

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in metric_names():
            raise ValueError(f"unknown metric {value!r}; allowed: {', '.join(metric_names())}")
        return value

    @model_validator(mode="after")
    def _one_prompt_source(self) -> PairTaskSpec:
        if (self.prompts is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'prompts' (a list of clean/corrupted/answer/wrong) or 'dataset'")
        if self.prompts is not None and not self.prompts:
            raise ValueError("'prompts' is empty: give at least one clean/corrupted pair")
        return self

    @classmethod
    def resolve_paths(cls, raw: dict, base_dir: str) -> dict:
        dataset = raw.get("dataset")
        if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
            from pathlib import Path

            path = Path(dataset["path"])
            if not path.is_absolute():
                raw = {**raw, "dataset": {**dataset, "path": str(Path(base_dir) / path)}}
        return raw


class PatchingSpec(PairTaskSpec):
    kind: Literal["patching"]
    sweep: str | list[str | dict] | dict = "resid_pre"
    direction: Literal["denoise", "noise"] = "denoise"
    method: Literal["exact", "atp", "both"] = "exact"
    ablation: Literal["zero", "mean", "resample"] | None = None
    batch_rows: PositiveInt | None = None
    memory_mb: PositiveInt = 1024
    interventions: list[DirectionIntervention] = Field(default_factory=list)

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, value):
        parse_sweeps(value)  # SweepError is a ValueError: reported at 'sweep'
        return value


def spec_pairs(spec: PairTaskSpec, tokenizer) -> list[PromptPair]:
    if spec.prompts is not None:
        return pairs_from_records([p.model_dump() for p in spec.prompts])
    data = spec.dataset
    if data is None:  # the spec's validator requires exactly one of prompts and dataset
        raise SpecError("dataset", "give exactly one of 'prompts' or 'dataset'", None)
    with at_path("dataset", data.model_dump(exclude_defaults=True)):
        if data.path is not None:
            return load_pairs(data.path)
        if data.name == "ioi":
            return ioi_pairs(
                tokenizer, data.n, seed=data.seed, corruption=data.corruption, order=data.order, template=data.template
            )
        return facts_pairs(tokenizer, data.n, seed=data.seed)


@lru_cache(maxsize=4)
def _pair_set(spec_json: str, tokenizer_id: int, tokenizer) -> PairSet:
    spec = PatchingSpec.model_validate_json(spec_json)
    return PairSet.tokenize(tokenizer, spec_pairs(spec, tokenizer))


def pair_set(spec: PatchingSpec, model) -> PairSet:
    return _pair_set(spec.model_dump_json(), id(model.tokenizer), model.tokenizer)


# the baselines a chunk computed, per model (weakly) and spec: finalize reuses them in the same
# process instead of running the clean and corrupted prompts again
_BASELINES: weakref.WeakKeyDictionary[object, dict[str, dict[str, float]]] = weakref.WeakKeyDictionary()


class PatchingRunner:
    """Runner of the ``patching`` kind (protocol: :mod:`interplab.jobs.registry`)."""

    def validate(self, spec: PatchingSpec, model) -> None:
        where = "prompts" if spec.prompts is not None else "dataset"
        if spec.prompts is not None:
            check_prompts(spec.prompts, model.tokenizer)
        try:
            pairs = pair_set(spec, model)
        except TaskError as exc:
            raise SpecError(
                where, str(exc), "(see message)", "equal-length clean/corrupted prompts, single-token answers"
            ) from None
        lengths = pairs.clean.lengths.minimum(pairs.corrupted.lengths).tolist()  # per pair, the shorter prompt
        check_direction_positions(spec, lengths, where)
        sweeps = parse_sweeps(spec.sweep)
        for sweep in sweeps:
            with at_path("sweep", sweep.name):
                model.validate_site(sweep.site(0))
        if any("position" in s.by for s in sweeps) and not pairs.same_length:
            raise SpecError(
                where,
                "sweeps by position need every prompt to have the same number of tokens",
                sorted(set(pairs.clean.lengths.tolist())),
                "one IOI template, or sweep by [layer] / [layer, head]",
            )

    def chunks(self, spec: PatchingSpec, model) -> list[str]:
        return [sweep.name for sweep in parse_sweeps(spec.sweep)]

    def run_chunk(self, spec: PatchingSpec, model, chunk_id: str, writer) -> None:
        sweep = next(s for s in parse_sweeps(spec.sweep) if s.name == chunk_id)
        result = _run(spec, model, [sweep], writer.store)
        _BASELINES.setdefault(model, {})[spec.model_dump_json()] = dict(result.baselines)
        writer.write_table("patching", result.to_arrow(), chunk=_key(chunk_id))
        if result.correlation:
            rows = [{"sweep": k, "name": "exact_atp_correlation", "value": v} for k, v in result.correlation.items()]
            writer.write_table("baselines", baselines_table(rows), chunk=_key(chunk_id))

    def finalize(self, spec: PatchingSpec, model, writer) -> JobSummary:
        import pyarrow as pa

        pairs = pair_set(spec, model)
        known = _BASELINES.get(model, {}).get(spec.model_dump_json())
        result = PatchingResult(baselines=known) if known else _run(spec, model, [], writer.store, baselines_only=True)
        writer.write_table("baselines", result.baselines_arrow(), chunk="baselines")
        tok = model.tokenizer
        rows = []
        for i in range(pairs.size):
            ids = pairs.clean.input_ids[i, : int(pairs.clean.lengths[i])].tolist()
            rows.append({"prompt_id": i, "n_tokens": len(ids), "token_ids": ids, "tokens": [tok.decode([t]) for t in ids]})
        writer.write_table("prompts", pa.Table.from_pylist(rows), chunk="prompts")
        names = ", ".join(s.name for s in parse_sweeps(spec.sweep))
        return JobSummary(
            lines=[
                f"{spec.method} {spec.direction} patching of {names} over {pairs.size} prompt pair(s), metric {spec.metric}",
                f"clean {result.baselines['clean']:.4f}, corrupted {result.baselines['corrupted']:.4f}",
                "heatmap: interplab plot {run_id} -o heatmap.png",
            ],
            sql=[
                "SELECT sweep, method, layer, position, head, round(normalized, 3) AS normalized FROM patching "
                "WHERE run_id = '{run_id}' ORDER BY abs(normalized) DESC LIMIT 10",
                "SELECT sweep, name, value FROM baselines WHERE run_id = '{run_id}'",
            ],
        )

    def provenance(self, spec: PatchingSpec) -> dict:
        return {"sweeps": [s.name for s in parse_sweeps(spec.sweep)]}

    def layer_work(self, spec: PatchingSpec, model) -> LayerWork | None:
        return layer_work(model.n_layers, spec.method)


def check_prompts(prompts: list[PairPrompt], tokenizer) -> None:
    """One :class:`SpecError` naming the first pair field that does not fit the tokenizer."""
    from interplab.engine.tokens import encode, show_tokens, single_token

    for i, pair in enumerate(prompts):
        clean, corrupted = encode(tokenizer, pair.clean), encode(tokenizer, pair.corrupted)
        if len(clean) != len(corrupted):
            raise SpecError(
                f"prompts[{i}].corrupted",
                f"clean and corrupted prompts need the same number of tokens: clean is {show_tokens(tokenizer, pair.clean)}, "
                f"corrupted is {show_tokens(tokenizer, pair.corrupted)}",
                pair.corrupted,
                f"a prompt of {len(clean)} tokens",
            )
        for field in ("answer", "wrong"):
            with at_path(f"prompts[{i}].{field}", getattr(pair, field), "a single token, e.g. ' Mary'"):
                single_token(tokenizer, getattr(pair, field), what=field)


def _key(chunk_id: str) -> str:
    return chunk_id.replace(":", "_").replace(",", "-")


def _run(spec: PatchingSpec, model, sweeps, store, baselines_only: bool = False):
    pairs = pair_set(spec, model)
    background = spec_interventions(spec, store) if spec.interventions else []
    try:
        return activation_patching(
            model,
            pairs,
            sweeps,
            direction=spec.direction,
            metric=spec.metric,
            method="exact" if baselines_only else spec.method,
            ablation=spec.ablation,
            batch_rows=spec.batch_rows,
            memory_mb=spec.memory_mb,
            seed=spec.seed,
            background=background,
        )
    except SweepError as exc:
        raise SpecError("sweep", str(exc), json.dumps(spec.sweep) if not isinstance(spec.sweep, str) else spec.sweep) from None
