"""The ``grafting`` job kind: extractive-structure experiments (Feng, Russell & Steinhardt 2024).

.. code-block:: yaml

    kind: grafting
    model: smollm2-135m
    data: {task: first_hop, n: 20, seed: 0}      # or {path: my_facts.yaml} (.yaml / .jsonl)
    experiments: [grafting, freezing, ordering, scores]
    finetune: {lr: 3.0e-5, epochs: 6, batch_size: 5}  # lr and epochs may be lists (a sweep)
    seeds: [0, 1, 2]                             # data assignment (data.seed + seed) and batch order
    split_layer: 22                              # early = [0, 22), late = [22, n_layers)
    save_deltas: true

One chunk per (experiment, lr, epochs, seed), each starting from the base weights. Tables (one
chunk each): ``grafting`` (mean rank / log-prob per variant and eval set), ``grafting_train``
(losses), ``deltas`` (safetensors files of W_F − θ, W_{F,ImplF} − W_F, W_{F'} − θ, W_{ImplF} − θ)
and ``grafting_scores`` (upstream / downstream / informative per layer, component, position).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from interplab.analyses.grafting import data as task_data
from interplab.analyses.grafting.data import GraftingDataError, TaskData
from interplab.analyses.grafting.experiments import ORDERS, Order, Outcome, Setting, run_freezing, run_grafting, run_ordering
from interplab.analyses.grafting.finetune import FinetuneConfig
from interplab.jobs.errors import SpecError
from interplab.jobs.registry import JobSummary
from interplab.jobs.spec import JobSpec, StrictModel

Experiment = Literal["grafting", "freezing", "ordering", "scores"]
EVAL_TABLE, TRAIN_TABLE, SCORES_TABLE, DELTAS_TABLE = "grafting", "grafting_train", "grafting_scores", "deltas"
_REQUIRED = {
    "grafting": ("F", "ImplF", "F_prime", "ImplF_prime"),
    "freezing": ("F", "ImplF"),
    "ordering": ("F", "ImplF", "F_new", "ImplF_new"),
    "scores": ("F", "ImplF"),
}


def _float(value):
    """YAML reads ``3e-5`` as a string; accept it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class DataSpec(StrictModel):
    """A built-in task (``first_hop`` / ``second_hop``, ``n`` facts) or a file of sets (``path``)."""

    task: Literal["first_hop", "second_hop"] | None = None
    path: str | None = None
    n: PositiveInt = 20
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if self.task is not None and self.path is not None:
            raise ValueError("give one of 'task' (first_hop, second_hop) or 'path' (a .yaml/.jsonl file), not both")
        return self

    def build(self, tokenizer, seed: int) -> TaskData:
        if self.path is not None:
            data = task_data.load_task_file(self.path)
        elif self.task == "second_hop":
            data = task_data.second_hop(tokenizer, self.n, seed=self.seed + seed)
        else:
            data = task_data.first_hop(tokenizer, self.n, seed=self.seed + seed)
        task_data.check_examples(tokenizer, data)
        return data


class FinetuneSpec(StrictModel):
    """``lr`` and ``epochs`` take one value or a list (a sweep: one chunk per combination)."""

    lr: list[PositiveFloat] = Field(default=[3e-5], min_length=1)
    epochs: list[PositiveInt] = Field(default=[6], min_length=1)
    batch_size: PositiveInt = 5

    @field_validator("lr", mode="before")
    @classmethod
    def _lr(cls, value):
        return [_float(v) for v in value] if isinstance(value, list) else [_float(value)]

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, value):
        return value if isinstance(value, list) else [value]

    def grid(self) -> list[tuple[float, int]]:
        return [(lr, ep) for lr in self.lr for ep in self.epochs]


class ScoresSpec(StrictModel):
    n: PositiveInt = 8  # implication prompts scored (of one token count)


class GraftingSpec(JobSpec):
    kind: Literal["grafting"]
    data: DataSpec = DataSpec(task="first_hop")
    experiments: list[Experiment] = Field(default=["grafting"], min_length=1)
    finetune: FinetuneSpec = FinetuneSpec()
    seeds: list[NonNegativeInt] = Field(default=[0], min_length=1)
    split_layer: PositiveInt | None = None
    orders: list[Order] = Field(default=list(ORDERS), min_length=1)
    save_deltas: bool = True
    delta_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    scores: ScoresSpec = ScoresSpec()

    @classmethod
    def resolve_paths(cls, raw: dict, base_dir: str) -> dict:
        data = raw.get("data")
        if isinstance(data, dict) and isinstance(data.get("path"), str):
            path = Path(data["path"]).expanduser()
            if not path.is_absolute():
                raw = {**raw, "data": {**data, "path": str(Path(base_dir) / path)}}
        return raw


def split_of(spec: GraftingSpec, n_layers: int) -> int:
    """Early/late boundary: ``split_layer``, else the paper's 24-of-32 proportion (rounded)."""
    return spec.split_layer if spec.split_layer is not None else max(1, min(n_layers - 1, round(0.75 * n_layers)))


def chunk_id(experiment: str, lr: float, epochs: int, seed: int) -> str:
    return f"{experiment}-lr{lr:g}-ep{epochs}-s{seed}"


def parse_chunk(chunk: str) -> tuple[str, float, int, int]:
    import re

    match = re.fullmatch(r"(\w+)-lr(.+)-ep(\d+)-s(\d+)", chunk)
    if match is None:
        raise ValueError(f"not a grafting chunk id: {chunk!r}")
    return match.group(1), float(match.group(2)), int(match.group(3)), int(match.group(4))


_THETA: dict[int, tuple[object, dict]] = {}


def base_weights(model) -> dict:
    """θ of this worker's model, captured before its first chunk trains it."""
    from interplab.analyses.grafting.weights import get_weights

    key = id(model)
    if key not in _THETA or _THETA[key][0] is not model:
        _THETA.clear()
        _THETA[key] = (model, get_weights(model))
    return _THETA[key][1]


class GraftingRunner:
    """Runner of the ``grafting`` kind (protocol: :mod:`interplab.jobs.registry`)."""

    def validate(self, spec: GraftingSpec, model) -> None:
        from interplab.jobs.model import uses_pipeline

        n_layers = int(model.config.num_hidden_layers)
        if spec.split_layer is not None and not 0 < spec.split_layer < n_layers:
            raise SpecError(
                "split_layer",
                f"must split the model's {n_layers} layers into two non-empty parts",
                spec.split_layer,
                f"an integer in 1..{n_layers - 1}",
            )
        if "scores" in spec.experiments and uses_pipeline(spec):
            raise SpecError(
                "experiments",
                "scores need the single-process model (they run one layer at a time)",
                spec.experiments,
                "grafting, freezing, ordering with parallel.stages > 1",
            )
        where = "data.path" if spec.data.path is not None else "data"
        value = spec.data.path if spec.data.path is not None else spec.data.model_dump(exclude_defaults=True)
        try:
            data = spec.data.build(model.tokenizer, spec.seeds[0])
            for experiment in spec.experiments:
                task_data.require(data, _REQUIRED[experiment], experiment)
        except GraftingDataError as exc:
            raise SpecError(where, str(exc), value, "facts whose answers start with distinct tokens") from None
        if len(set(spec.seeds)) != len(spec.seeds):
            raise SpecError("seeds", "seeds must be distinct", spec.seeds, "a list of distinct integers")

    def chunks(self, spec: GraftingSpec, model) -> list[str]:
        return [chunk_id(e, lr, ep, s) for e in spec.experiments for lr, ep in spec.finetune.grid() for s in spec.seeds]

    def run_chunk(self, spec: GraftingSpec, model, chunk: str, writer) -> None:
        experiment, lr, epochs, seed = parse_chunk(chunk)
        theta = base_weights(model)
        data = spec.data.build(model.tokenizer, seed)
        config = FinetuneConfig(lr=lr, epochs=epochs, batch_size=spec.finetune.batch_size, seed=seed)
        setting = Setting(config, split_of(spec, model.n_layers), model.n_layers)
        labels = {"lr": lr, "epochs": epochs, "batch_size": config.batch_size, "seed": seed}
        if experiment == "scores":
            self._scores(spec, model, data, setting, theta, writer, chunk, labels)
            return
        runs = {"grafting": run_grafting, "freezing": run_freezing}
        if experiment == "ordering":
            outcome = run_ordering(model, data, setting, theta, spec.orders)
        else:
            outcome = runs[experiment](model, data, setting, theta)
        self._write(spec, outcome, writer, chunk, experiment, labels)

    def _write(self, spec, outcome: Outcome, writer, chunk: str, experiment: str, labels: dict) -> None:
        from interplab.analyses.grafting import deltas as D
        from interplab.analyses.grafting import tables

        writer.write_table(
            TRAIN_TABLE, tables.train_table([{**labels, "experiment": experiment, **r} for r in outcome.train]), chunk=chunk
        )
        if spec.save_deltas and outcome.deltas:
            rows = [
                D.save_delta(
                    writer, f"{name}.{chunk}", delta, {"experiment": experiment, "delta": name, **labels}, dtype=spec.delta_dtype
                )
                for name, delta in outcome.deltas.items()
            ]
            writer.write_table(DELTAS_TABLE, tables.deltas_table(rows), chunk=chunk)
        writer.write_table(EVAL_TABLE, tables.eval_table([{**labels, **r} for r in outcome.evals]), chunk=chunk)

    def _scores(self, spec, model, data: TaskData, setting: Setting, theta, writer, chunk: str, labels: dict) -> None:
        from interplab.analyses.grafting import scores as S
        from interplab.analyses.grafting import tables
        from interplab.analyses.grafting.experiments import train_logged
        from interplab.analyses.grafting.weights import set_weights

        outcome = Outcome()
        set_weights(model, theta)
        w_f = train_logged(model, outcome, data["F"], setting.config, "W_F")
        examples, cfs = S.aligned(
            model.tokenizer, data["ImplF"], S.counterfactuals(data["ImplF"], model.tokenizer), spec.scores.n
        )
        values = S.extractive_scores(model, theta, w_f, examples, cfs)
        ids = model.tokenize(examples[0].prompt).input_ids[0].tolist()
        tokens = [model.tokenizer.decode([i]) for i in ids]
        rows = S.score_rows(model, values, tokens, {**labels, "delta": "W_F-theta", "eval_set": "ImplF", "n": len(examples)})
        writer.write_table(
            TRAIN_TABLE, tables.train_table([{**labels, "experiment": "scores", **r} for r in outcome.train]), chunk=chunk
        )
        writer.write_table(SCORES_TABLE, tables.scores_table(rows), chunk=chunk)

    def finalize(self, spec: GraftingSpec, model, writer) -> JobSummary:
        lines = [
            f"grafting job: {', '.join(spec.experiments)}; {len(spec.seeds)} seed(s); "
            f"lr x epochs {', '.join(f'{lr:g}x{ep}' for lr, ep in spec.finetune.grid())}"
        ]
        lines.append("rank tables and score heatmaps: interplab plot {run_id} -o grafting.png")
        sql = []
        if "grafting" in spec.experiments:
            sql.append(
                "SELECT variant, layers, eval_set, round(avg(mean_rank), 2) AS mean_rank, count(*) AS runs "
                "FROM grafting WHERE run_id = '{run_id}' AND experiment = 'grafting' AND eval_set = 'ImplF_prime' "
                "GROUP BY ALL ORDER BY variant, layers"
            )
        if "freezing" in spec.experiments:
            sql.append(
                "SELECT variant, layers, eval_set, round(avg(mean_rank), 2) AS mean_rank FROM grafting "
                "WHERE run_id = '{run_id}' AND experiment = 'freezing' GROUP BY ALL ORDER BY ALL"
            )
        if "ordering" in spec.experiments:
            sql.append(
                "SELECT variant AS ordering, epoch, round(avg(mean_rank), 2) AS implf_new_rank FROM grafting "
                "WHERE run_id = '{run_id}' AND experiment = 'ordering' AND eval_set = 'ImplF_new' GROUP BY ALL ORDER BY ALL"
            )
        if "scores" in spec.experiments:
            sql.append(
                "SELECT score, layer, component, head, position, round(avg(value), 4) AS value FROM grafting_scores "
                "WHERE run_id = '{run_id}' GROUP BY ALL ORDER BY abs(avg(value)) DESC LIMIT 10"
            )
        if spec.save_deltas and {"grafting"} & set(spec.experiments):
            sql.append("SELECT name, bytes, round(norm, 4) AS norm, path FROM deltas WHERE run_id = '{run_id}'")
        return JobSummary(lines=lines, sql=sql)

    def provenance(self, spec: GraftingSpec) -> dict:
        if spec.data.path is None:
            return {"data": spec.data.task or "first_hop"}
        import hashlib

        return {"data_sha256": hashlib.sha256(Path(spec.data.path).read_bytes()).hexdigest()}
