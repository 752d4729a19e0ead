"""The ``circuit`` job kind.

.. code-block:: yaml

    kind: circuit
    model: smollm2-135m
    dataset: {name: ioi, n: 16, template: 0}    # or prompts: [...], or {path: pairs.jsonl}
    metric: logit_diff                           # the task metric m; kl is allowed too
    methods: [eap-ig-inputs, eap]                # eap | eap-ig-inputs | eap-ig-activations | clean-corrupted | exact | acdc
    ig_steps: 5
    level: edge                                  # edge | node (a node keeps or drops all its edges)
    circuit: {rule: topn, size: 370, absolute: true, prune: true}   # rule: topn | greedy | threshold
    faithfulness: mib                            # MIB's size grid, or a list of edge counts, or none
    acdc: {threshold: 0.01, metric: kl}

One chunk per method. Rows land in ``edges`` (every edge's score), ``circuits`` (the extracted
circuit's edges), ``faithfulness`` (the curves; CPR/CMD in ``circuit_summary``). ``export_mib``
also writes each method's scores and circuit as MIB JSON next to the run (``interplab circuit``
prints the path).
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from interplab.analyses.circuits import extract
from interplab.analyses.circuits.evaluate import evaluate
from interplab.analyses.circuits.faithfulness import Curve, cpr_cmd, faithfulness_curve, to_mib
from interplab.analyses.circuits.graph import CircuitGraph, GraphError, circuit_families
from interplab.analyses.circuits.scores import METHODS, acdc, score_edges
from interplab.analyses.circuits.task import CircuitTask, prepare
from interplab.analyses.patching.job import PairTaskSpec, check_prompts, spec_pairs
from interplab.analyses.tasks import PairSet, TaskError
from interplab.jobs.errors import SpecError
from interplab.jobs.registry import JobSummary
from interplab.jobs.spec import StrictModel


class CircuitRule(StrictModel):
    rule: Literal["topn", "greedy", "threshold"] = "topn"
    size: PositiveInt = 370
    threshold: float | None = None
    absolute: bool = True
    prune: bool = True

    @model_validator(mode="after")
    def _threshold(self) -> CircuitRule:
        if self.rule == "threshold" and self.threshold is None:
            raise ValueError("rule 'threshold' needs 'threshold: <score>'")
        return self


class AcdcOptions(StrictModel):
    threshold: float = Field(default=0.01, gt=0)
    metric: str | None = None


class CircuitSpec(PairTaskSpec):
    kind: Literal["circuit"]
    methods: list[str] = Field(default_factory=lambda: ["eap-ig-inputs"], min_length=1)
    ig_steps: PositiveInt = 5
    level: Literal["edge", "node"] = "edge"
    circuit: CircuitRule = Field(default_factory=CircuitRule)
    faithfulness: Literal["mib", "none"] | list[PositiveInt] = "mib"
    acdc: AcdcOptions = Field(default_factory=AcdcOptions)
    export_mib: bool = True
    max_rows: PositiveInt | None = None

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        for i, method in enumerate(value):
            if method not in METHODS:
                raise ValueError(f"methods[{i}]: unknown method {method!r}; allowed: {', '.join(METHODS)}")
        if len(set(value)) != len(value):
            raise ValueError("methods: each method once")
        return value


@lru_cache(maxsize=2)
def _task(spec_json: str, model_key: int, model) -> CircuitTask:
    spec = CircuitSpec.model_validate_json(spec_json)
    pairs = PairSet.tokenize(model.tokenizer, spec_pairs(spec, model.tokenizer))
    return prepare(model, pairs, spec.metric)


def circuit_task(spec: CircuitSpec, model) -> CircuitTask:
    data = spec.model_dump(include={"prompts", "dataset", "metric", "kind", "model"})
    return _task(CircuitSpec.model_validate(data).model_dump_json(), id(model), model)


def _edge_scores(spec: CircuitSpec, task: CircuitTask, method: str):
    graph = task.graph
    if method == "acdc":
        result = acdc(task, spec.acdc.threshold, spec.acdc.metric)
        return result.scores, result.circuit
    scores = score_edges(task, method, ig_steps=spec.ig_steps, max_rows=spec.max_rows)
    if spec.level == "node":
        scores = graph.node_level(scores.sum(1))
    return scores, None


def _circuit(spec: CircuitSpec, graph: CircuitGraph, scores, fixed):
    rule = spec.circuit
    if fixed is not None:  # ACDC decides its circuit itself
        return extract.prune(graph, fixed) if rule.prune else fixed
    return extract.circuit(
        graph, scores, rule=rule.rule, size=rule.size, tau=rule.threshold, absolute=rule.absolute, prune_dangling=rule.prune
    )


def _curve_rows(curve: Curve, method: str) -> list[dict]:
    return [
        {
            "method": method,
            "rule": curve.rule,
            "absolute": curve.absolute,
            "n_edges": size,
            "fraction": size / curve.n_edges,
            "kept": kept,
            "value": value,
            "faithfulness": faith,
        }
        for size, kept, value, faith in zip(curve.sizes, curve.kept, curve.values, curve.faithfulness)
    ]


class CircuitRunner:
    """Runner of the ``circuit`` kind (protocol: :mod:`interplab.jobs.registry`)."""

    def validate(self, spec: CircuitSpec, model) -> None:
        where = "prompts" if spec.prompts is not None else "dataset"
        try:
            CircuitGraph.of(model)
        except GraphError as exc:
            raise SpecError("model", str(exc), spec.model, f"a model of family {' or '.join(circuit_families())}") from None
        if spec.prompts is not None:
            check_prompts(spec.prompts, model.tokenizer)
        try:
            pairs = PairSet.tokenize(model.tokenizer, spec_pairs(spec, model.tokenizer))
        except TaskError as exc:
            raise SpecError(
                where, str(exc), "(see message)", "equal-length clean/corrupted prompts, single-token answers"
            ) from None
        if not bool((pairs.clean.lengths == pairs.corrupted.lengths).all()):
            raise SpecError(where, "clean and corrupted prompts must have equal token lengths pair by pair", "(see prompts)")

    def chunks(self, spec: CircuitSpec, model) -> list[str]:
        return list(spec.methods)

    def run_chunk(self, spec: CircuitSpec, model, chunk_id: str, writer) -> None:
        import pyarrow as pa

        task = circuit_task(spec, model)
        graph = task.graph
        started = time.perf_counter()
        scores, fixed = _edge_scores(spec, task, chunk_id)
        seconds = time.perf_counter() - started
        mask = _circuit(spec, graph, scores, fixed)
        src, dst = graph.edges[:, 0], graph.edges[:, 1]
        names_src, names_dst = graph.source_names, graph.dest_names
        edges = pa.table(
            {
                "method": [chunk_id] * graph.n_edges,
                "src": [names_src[i] for i in src.tolist()],
                "dst": [names_dst[i] for i in dst.tolist()],
                "src_layer": graph.source_layer[src].tolist(),  # already Long
                "dst_layer": [graph.dest_layer(int(d)) for d in dst],
                "score": scores[src, dst].double().tolist(),
                "in_circuit": mask[src, dst].tolist(),
            }
        )
        writer.write_table("edges", edges, chunk=_key(chunk_id))
        kept = mask.nonzero().tolist()
        writer.write_table(
            "circuits",
            pa.table(
                {
                    "method": [chunk_id] * len(kept),
                    "rule": [spec.circuit.rule if fixed is None else "acdc"] * len(kept),
                    "src": [names_src[s] for s, _ in kept],
                    "dst": [names_dst[d] for _, d in kept],
                },
                schema=pa.schema([("method", pa.string()), ("rule", pa.string()), ("src", pa.string()), ("dst", pa.string())]),
            ),
            chunk=_key(chunk_id),
        )
        summary = {
            "method": chunk_id,
            "seconds": seconds,
            "n_graph_edges": graph.n_edges,
            "circuit_edges": len(kept),
            "clean": float(task.clean_value.mean()),
            "corrupted": float(task.corrupt_value.mean()),
            "circuit_value": None,
            "cpr": None,
            "cmd": None,
        }
        if spec.faithfulness != "none":
            summary["circuit_value"] = float(evaluate(task, mask))
            if spec.faithfulness == "mib":
                cpr, cmd, signed, absolute = cpr_cmd(task, scores, method=chunk_id)
                summary["cpr"], summary["cmd"] = cpr, cmd
                rows = _curve_rows(signed, chunk_id) + _curve_rows(absolute, chunk_id)
            else:
                sizes = [min(int(s), graph.n_edges) for s in spec.faithfulness]
                rows = _curve_rows(
                    faithfulness_curve(task, scores, sizes=sizes, absolute=spec.circuit.absolute, method=chunk_id), chunk_id
                )
            writer.write_table("faithfulness", pa.Table.from_pylist(rows), chunk=_key(chunk_id))
        writer.write_table("circuit_summary", pa.Table.from_pylist([summary], schema=_summary_schema()), chunk=_key(chunk_id))
        if spec.export_mib:
            writer.write_table(
                "mib_exports",
                pa.table({"method": [chunk_id], "json": [json.dumps(to_mib(graph, scores, mask, d_model=model.d_model))]}),
                chunk=_key(chunk_id),
            )

    def finalize(self, spec: CircuitSpec, model, writer) -> JobSummary:
        task = circuit_task(spec, model)
        lines = [
            f"{', '.join(spec.methods)} over {task.graph.n_edges} edges, {task.n} prompt pair(s), metric {spec.metric} "
            f"(clean {float(task.clean_value.mean()):.3f}, corrupted {float(task.corrupt_value.mean()):.3f})",
            "circuit diagram: interplab plot {run_id} -o circuit.svg",
        ]
        return JobSummary(
            lines=lines,
            sql=[
                "SELECT method, circuit_edges, round(circuit_value, 3) AS m_circuit, round(cpr, 3) AS cpr, round(cmd, 3) AS cmd, "
                "round(seconds, 1) AS seconds FROM circuit_summary WHERE run_id = '{run_id}'",
                "SELECT method, src, dst, round(score, 4) AS score FROM edges WHERE run_id = '{run_id}' "
                "ORDER BY abs(score) DESC LIMIT 10",
            ],
        )

    def provenance(self, spec: CircuitSpec) -> dict:
        return {"methods": list(spec.methods)}


def _key(chunk_id: str) -> str:
    return chunk_id.replace("-", "_")


def _summary_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("method", pa.string()),
            ("seconds", pa.float64()),
            ("n_graph_edges", pa.int64()),
            ("circuit_edges", pa.int64()),
            ("clean", pa.float64()),
            ("corrupted", pa.float64()),
            ("circuit_value", pa.float64()),
            ("cpr", pa.float64()),
            ("cmd", pa.float64()),
        ]
    )
