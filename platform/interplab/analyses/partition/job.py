"""The ``partition`` job kind: an exemplar dictionary of one site's activations.

.. code-block:: yaml

    kind: partition
    model: smollm2-135m
    capture_run: capture-20261203T101500-1a2b3c4d   # a committed capture run ...
    site: resid_post.10                             # ... and one of its sites
    # or  sql: "SELECT run_id, prompt_id, position, token, act FROM activations WHERE ..."
    # or  dataset: {builtin: ioi, limit: 64} + site: resid_post.10 (captured first, into a capture run)
    metric: cosine            # cosine | euclidean
    threshold: p5             # a distance (0.3), or pN: the N-th percentile of sampled pairwise distances
    top_k: 8                  # members kept per region
    match_with: []            # partition runs whose dictionaries this one is matched against

The job has one chunk, ``input``: with ``dataset``/``prompts`` it captures the site into a capture
run ``<run_id>-capture`` in the same store (the ``capture`` kind's own runner, in this process),
otherwise it checks the input. ``finalize`` then streams the rows through the leader build, assigns
every row its region (Ray tasks over windows of the input), and writes the tables behind the views
``dictionaries``, ``exemplars``, ``regions``, ``region_members`` and ``partition_match``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, PositiveInt, field_validator, model_validator

from interplab.analyses.partition import assign as assign_mod
from interplab.analyses.partition import source as src
from interplab.analyses.partition.dictionary import (
    DICTIONARIES_TABLE,
    EXEMPLARS_TABLE,
    MATCH_TABLE,
    MEMBERS_TABLE,
    REGIONS_TABLE,
    Dictionary,
    load_dictionary,
    vector_column,
)
from interplab.analyses.partition.leader import LeaderBuilder, ThresholdRule, percentile_threshold
from interplab.analyses.partition.match import match_dictionaries, summarize_match
from interplab.engine.sites import Site
from interplab.jobs.errors import SpecError, at_path
from interplab.jobs.registry import JobSummary
from interplab.jobs.spec import DatasetSpec, JobSpec
from interplab.store import PART_OF

if TYPE_CHECKING:
    from interplab.store import Store
    from interplab.store.writer import RunWriter

INPUT_CHUNK = "input"
CONTEXT_BEFORE, CONTEXT_AFTER = 8, 2


class PartitionSpec(JobSpec):
    kind: Literal["partition"]
    capture_run: str | None = None
    sql: str | None = None
    prompts: list[str] | None = None
    dataset: DatasetSpec | None = None
    site: str | None = None
    positions: list[int] | Literal["all"] = Field(default="all", union_mode="left_to_right")
    store_dtype: Literal["float16", "float32"] = "float32"
    metric: Literal["cosine", "euclidean"] = "cosine"
    threshold: float | str = Field(default="p5", union_mode="left_to_right")
    sample: PositiveInt = 2000
    block_rows: PositiveInt = 4096
    window_rows: PositiveInt = 16384
    top_k: PositiveInt = 8
    assign_tasks: PositiveInt = 4
    match_with: list[str] = Field(default_factory=list)
    match_similarity: float = Field(default=0.9, gt=-1.0, le=1.0)

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: float | str) -> float | str:
        ThresholdRule.parse(value)
        return value

    @field_validator("positions")
    @classmethod
    def _positions(cls, value: list[int] | str) -> list[int] | str:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError(
                "positions must be 'all' or a non-empty list of distinct token positions (negative counts from the end)"
            )
        return value

    @field_validator("site")
    @classmethod
    def _site(cls, value: str | None) -> str | None:
        if value is not None:
            Site.parse(value)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> PartitionSpec:
        sources = [name for name in ("capture_run", "sql") if getattr(self, name) is not None]
        if self.prompts is not None or self.dataset is not None:
            sources.append("prompts" if self.prompts is not None else "dataset")
        if len(sources) != 1 or (self.prompts is not None and self.dataset is not None):
            raise ValueError(
                "give exactly one input: 'capture_run' (+ 'site'), 'sql' (a query returning prompt_id, position, act), "
                f"or 'dataset'/'prompts' (+ 'site', captured first); got {', '.join(sources) or 'none'}"
            )
        if self.sql is None and self.site is None:
            raise ValueError(f"'site' is required with '{sources[0]}' (e.g. site: resid_post.10)")
        if self.sql is not None and self.site is not None:
            raise ValueError("'site' goes with capture_run or dataset; with 'sql' the query selects the rows")
        if self.positions != "all" and self.prompts is None and self.dataset is None:
            raise ValueError("'positions' applies to prompts captured by this job (dataset/prompts); a stored run keeps its own")
        if self.prompts is not None and not self.prompts:
            raise ValueError("'prompts' is empty: give at least one prompt")
        return self

    def prompt_texts(self) -> list[str]:
        """The prompts this job captures (none when it reads a stored run)."""
        if self.prompts is not None:
            return list(self.prompts)
        return self.dataset.texts() if self.dataset is not None else []

    def rule(self) -> ThresholdRule:
        return ThresholdRule.parse(self.threshold)


def capture_run_id(run_id: str) -> str:
    """The capture run a ``dataset``/``prompts`` partition run writes its activations to."""
    return f"{run_id}-capture"


def capture_spec(spec: PartitionSpec):
    """The capture job that captures a partition spec's prompts (a valid ``capture`` spec)."""
    from interplab.jobs.capture import CaptureSpec

    raw: dict[str, Any] = {
        "kind": "capture",
        "model": spec.model,
        "dtype": spec.dtype,
        "device": spec.device,
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "sites": [spec.site],
        "positions": spec.positions,
        "store_dtype": spec.store_dtype,
        "description": "activations captured for a partition run",
    }
    if spec.prompts is not None:
        raw["prompts"] = list(spec.prompts)
    elif spec.dataset is not None:
        raw["dataset"] = spec.dataset.model_dump()
    return CaptureSpec.model_validate(raw)


class PartitionRunner:
    """Runner of the ``partition`` kind (protocol: :mod:`interplab.jobs.registry`)."""

    def validate(self, spec: PartitionSpec, model) -> None:
        if spec.site is not None:
            with at_path("site", spec.site, "a site of this model, e.g. resid_post.10 (list them: interplab sites MODEL)"):
                parsed = model.validate_site(spec.site)
            if not parsed.kind.fixed_width:
                raise SpecError(
                    "site",
                    "attention patterns vary in width; partition a fixed-width site",
                    spec.site,
                    "resid_*, z, mlp_out, ...",
                )
        if spec.prompts is not None or spec.dataset is not None:
            from interplab.jobs.capture import CaptureRunner

            CaptureRunner().validate(capture_spec(spec), model)  # the prompts fit the model; positions in range

    def chunks(self, spec: PartitionSpec, model) -> list[str]:
        return [INPUT_CHUNK]

    def run_chunk(self, spec: PartitionSpec, model, chunk_id: str, writer: RunWriter) -> None:
        if spec.prompts is not None or spec.dataset is not None:
            capture_into(spec, model, writer.store, capture_run_id(writer.run_id), for_run=writer.run_id)
        else:
            _selection(spec, writer.store, writer.run_id)  # the input exists and has rows: fail early

    def finalize(self, spec: PartitionSpec, model, writer: RunWriter) -> JobSummary:
        result = partition(spec, writer.store, writer)
        lines = [
            f"{result['n_regions']} regions from {result['n_rows']} rows of {result['input']} "
            f"({spec.metric} distance, threshold {result['threshold']:.4g}{_rule_text(spec)})",
            f"build {result['build_s']:.2f} s ({result['n_rows'] / max(result['build_s'], 1e-9):,.0f} rows/s), "
            f"assignment {result['assign_s']:.2f} s",
            "plot: interplab plot {run_id} -o partition.png",
        ]
        lines += result["match_lines"]
        sql = [
            "SELECT region, token, n_members, round(mean_distance, 3) AS mean_distance FROM exemplars "
            "WHERE run_id = '{run_id}' ORDER BY n_members DESC LIMIT 10",
            "SELECT region, rank, token, context FROM region_members WHERE run_id = '{run_id}' AND rank < 3 ORDER BY region, rank LIMIT 15",
            "SELECT n_rows, n_regions, threshold, metric FROM dictionaries WHERE run_id = '{run_id}'",
        ]
        return JobSummary(lines=lines, sql=sql)

    def provenance(self, spec: PartitionSpec) -> dict[str, Any]:
        out: dict[str, Any] = {"threshold": spec.threshold, "metric": spec.metric}
        if spec.capture_run is not None:
            out["inputs"] = [spec.capture_run]
        if spec.match_with:
            out["inputs"] = [*out.get("inputs", []), *spec.match_with]
        if spec.sql is not None:
            out["sql"] = spec.sql
        texts = spec.prompt_texts()
        if texts:
            from interplab.jobs import datasets

            out.update(n_prompts=len(texts), prompts_sha256=datasets.fingerprint(texts))
        return out


def _rule_text(spec: PartitionSpec) -> str:
    rule = spec.rule()
    return f" = p{rule.percentile:g} of {spec.sample} sampled rows" if rule.percentile is not None else ""


def capture_into(spec: PartitionSpec, model, store: Store, run_id: str, for_run: str | None = None) -> str:
    """Capture the spec's prompts at its site into the capture run ``run_id`` (resumed if it exists);
    ``for_run`` (the partition run it is captured for) goes into its provenance."""
    from interplab.jobs.capture import CaptureRunner
    from interplab.store import StoreError

    cap = capture_spec(spec)
    runner = CaptureRunner()
    try:
        info = store.run(run_id)
    except StoreError:
        info = None
    if info is not None and info.status == "committed":
        return run_id
    if info is None:
        writer = store.begin_run(
            "capture",
            model=model.name,
            spec=cap.to_record(),
            weight_hash=model.weight_hash,
            run_id=run_id,
            provenance={**runner.provenance(cap), **({PART_OF: for_run} if for_run else {})},  # kept while for_run is
        )
    else:
        writer = store.resume_run(run_id)
    done = {str(c).zfill(6) if isinstance(c, int) else str(c) for c in writer.written_chunks()}
    for chunk in runner.chunks(cap, model):
        if chunk not in done:
            runner.run_chunk(cap, model, chunk, writer)
    summary = runner.finalize(cap, model, writer)
    writer.commit({"summary": {"lines": summary.lines, "sql": summary.sql}})
    return run_id


def _selection(spec: PartitionSpec, store: Store, run_id: str) -> src.Selection:
    from interplab.store import StoreError

    try:
        if spec.sql is not None:
            return src.sql_selection(store, spec.sql)
        stored = spec.capture_run if spec.capture_run is not None else capture_run_id(run_id)
        if spec.capture_run is not None:
            info = store.run(stored)
            if info.model not in (None, spec.model):
                raise SpecError("model", f"capture_run {stored!r} holds activations of {info.model}", spec.model, str(info.model))
        return src.run_selection(store, stored, spec.site or "")
    except (src.SourceError, StoreError) as exc:
        where = "sql" if spec.sql is not None else "capture_run" if spec.capture_run is not None else "dataset"
        raise SpecError(
            where, str(exc), spec.sql or spec.capture_run or "", "a committed run and site (see the message)"
        ) from None


def resolve_threshold(spec: PartitionSpec, store: Store, selection: src.Selection, windows: list[src.Window]) -> float:
    rule = spec.rule()
    if rule.value is not None:
        return rule.value
    sample = src.sample_rows(store, selection, windows, spec.sample, spec.seed)
    return percentile_threshold(sample, rule.percentile or 0.0, spec.metric)


def build_dictionary(
    store: Store, selection: src.Selection, windows: list[src.Window], threshold: float, metric, block_rows: int
) -> tuple[LeaderBuilder, pa.Table]:
    """Stream every window through the leader build; the builder and its exemplars' row keys."""
    builder: LeaderBuilder | None = None
    keys: list[pa.Table] = []
    for window in windows:
        rows = src.read_window(store, selection, window)
        if builder is None:
            builder = LeaderBuilder(rows.act.shape[1], threshold, metric)
        key_table = assign_mod.keys_table(rows)
        for start in range(0, rows.act.shape[0], block_rows):
            new = builder.add(rows.act[start : start + block_rows])
            if len(new):
                keys.append(key_table.take(pa.array(new + start)))
    if builder is None or builder.size == 0:
        raise SpecError("(input)", "the selection has no rows", "", "a selection with activation rows")
    return builder, pa.concat_tables(keys)


def partition(spec: PartitionSpec, store: Store, writer: RunWriter) -> dict[str, Any]:
    """Build, assign, write every table; returns the numbers of the summary."""
    selection = _selection(spec, store, writer.run_id)
    windows = src.plan_windows(store, selection, spec.window_rows)
    inputs = src.input_runs(store, selection)
    threshold = resolve_threshold(spec, store, selection, windows)

    started = time.perf_counter()
    builder, exemplar_keys = build_dictionary(store, selection, windows, threshold, spec.metric, spec.block_rows)
    build_s = time.perf_counter() - started
    site = spec.site if spec.sql is None else None
    dictionary = Dictionary(builder.exemplars.numpy().copy(), spec.metric, threshold, site, writer.run_id)

    started = time.perf_counter()
    k = dictionary.size
    counts = np.zeros(k, dtype=np.int64)
    sums = np.zeros(k, dtype=np.float64)
    maxima = np.zeros(k, dtype=np.float32)
    tops = []
    for result in assign_mod.assign_windows(store.uri, selection, windows, dictionary, spec.top_k, spec.assign_tasks):
        writer.write_table(REGIONS_TABLE, result.regions, chunk=f"w{result.index:06d}")
        counts += result.counts
        sums += result.distance_sum
        maxima = np.maximum(maxima, result.distance_max)
        tops.append(assign_mod.merge_top([result.top], spec.top_k).drop_columns(["rank"]))
        if len(tops) > 8:
            tops = [assign_mod.merge_top(tops, spec.top_k).drop_columns(["rank"])]
    members = assign_mod.merge_top(tops, spec.top_k).drop_columns(["stream"])
    assign_s = time.perf_counter() - started
    n_rows = int(counts.sum())

    exemplars = exemplar_keys.append_column("region", pa.array(np.arange(k, dtype=np.int32)))
    exemplars = exemplars.append_column("n_members", pa.array(counts))
    exemplars = exemplars.append_column("mean_distance", pa.array(sums / np.maximum(counts, 1)))
    exemplars = exemplars.append_column("max_distance", pa.array(maxima))
    exemplars = exemplars.append_column("vector", vector_column(dictionary.vectors))
    writer.write_table(EXEMPLARS_TABLE, exemplars, chunk="exemplars")
    writer.write_table(MEMBERS_TABLE, with_context(store, members), chunk="members")

    rule = spec.rule()
    summary_row = {
        "site": [site],
        "metric": [spec.metric],
        "threshold": [float(threshold)],
        "threshold_rule": [str(spec.threshold)],
        "percentile": [rule.percentile],
        "n_rows": [n_rows],
        "n_regions": [k],
        "d": [dictionary.d],
        "inputs": [inputs],
        "build_seconds": [build_s],
        "assign_seconds": [assign_s],
    }
    writer.write_table(DICTIONARIES_TABLE, pa.table(summary_row), chunk="dictionary")

    match_lines = []
    for i, other in enumerate(spec.match_with):
        with at_path(f"match_with[{i}]", other):
            theirs = load_dictionary(store, other)
            table = match_dictionaries(theirs, dictionary, spec.match_similarity)
        writer.write_table(MATCH_TABLE, table, chunk=f"match-{i:03d}")
        m = summarize_match(table)
        match_lines.append(
            f"vs {other}: {m.preserved} preserved, {m.new} new, {m.vanished} vanished (similarity >= {spec.match_similarity:g})"
        )
    return {
        "n_regions": k,
        "n_rows": n_rows,
        "threshold": threshold,
        "input": selection.description,
        "build_s": build_s,
        "assign_s": assign_s,
        "match_lines": match_lines,
    }


def with_context(store: Store, members: pa.Table) -> pa.Table:
    """``members`` with ``context`` (a few tokens around the member, the member in [brackets]) and
    ``prompt`` (the whole prompt's text), from the input runs' ``prompts`` rows where they exist."""
    runs = sorted({r for r in members.column("source_run").to_pylist() if r is not None})
    tokens: dict[tuple[str, int], list[str]] = {}
    if runs:
        ids = sorted({int(p) for p in members.column("prompt_id").to_pylist()})
        rows = store.sql(
            "SELECT run_id, prompt_id, tokens FROM prompts WHERE list_contains($runs, run_id) AND list_contains($ids, prompt_id)",
            {"runs": runs, "ids": ids},
        ).to_pylist()
        tokens = {(r["run_id"], int(r["prompt_id"])): list(r["tokens"] or []) for r in rows}
    contexts: list[str | None] = []
    prompts: list[str | None] = []
    for run, pid, pos in zip(
        members.column("source_run").to_pylist(),
        members.column("prompt_id").to_pylist(),
        members.column("position").to_pylist(),
        strict=True,
    ):
        toks = tokens.get((run, int(pid))) if run is not None else None
        if toks is None or pos is None or not 0 <= pos < len(toks):
            contexts.append(None)
            prompts.append(None)
            continue
        before = "".join(toks[max(0, pos - CONTEXT_BEFORE) : pos])
        after = "".join(toks[pos + 1 : pos + 1 + CONTEXT_AFTER])
        contexts.append(f"{before}[{toks[pos]}]{after}")
        prompts.append("".join(toks))
    return members.append_column("context", pa.array(contexts, pa.string())).append_column(
        "prompt", pa.array(prompts, pa.string())
    )
