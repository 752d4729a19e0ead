"""Labelled prompts for probes: prompt texts and one class label each.

Three sources (exactly one per spec):

* ``name: ioi`` / ``name: facts`` — the analyses' seeded task generators
  (:func:`~interplab.analyses.tasks.ioi_pairs`, :func:`~interplab.analyses.tasks.facts_pairs`), their
  clean prompts. IOI labels: ``io`` (the indirect object's name, e.g. ``Mary``; the default) or
  ``order`` (``io_first`` / ``s_first``: which of the two names introduced first is the indirect
  object). Facts label: ``answer`` (the attribute, e.g. the city ``Paris``).
* ``builtin: ioi`` / ``builtin: facts`` — the record sets capture jobs use
  (:mod:`interplab.jobs.datasets`); ``label`` names a record field (``answer``).
* ``path: prompts.jsonl`` (or .yaml/.parquet) — ``field`` is the prompt column (``prompt``), ``label``
  the label column (required). Values of any JSON scalar type become their text form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import PositiveInt, model_validator

from interplab.jobs.errors import SpecError
from interplab.jobs.spec import StrictModel

TASK_LABELS = {"ioi": ("io", "order"), "facts": ("answer",)}


class ProbeDataset(StrictModel):
    """Labelled prompts: a task generator (``name``), a built-in record set (``builtin``) or a file (``path``).

    ``n``, ``seed``, ``template`` and ``order`` configure the task generators (as in patching specs);
    ``field`` (the prompt column) and ``limit`` (the first records) the record sets and files."""

    name: Literal["ioi", "facts"] | None = None
    builtin: Literal["ioi", "facts"] | None = None
    path: str | None = None
    label: str | None = None
    field: str = "prompt"
    n: PositiveInt = 256
    seed: int = 0
    template: int | Literal["all"] = 0
    order: Literal["BABA", "ABBA", "mixed"] = "mixed"
    limit: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ProbeDataset:
        given = [k for k in ("name", "builtin", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'name' (ioi, facts: task generators), 'builtin' (ioi, facts: record sets) "
                f"or 'path' (a .yaml/.jsonl/.parquet file); got {given or 'none'}"
            )
        if self.name is not None:
            allowed = TASK_LABELS[self.name]
            if self.label is not None and self.label not in allowed:
                raise ValueError(f"label {self.label!r} is not a label of task {self.name!r}; allowed: {', '.join(allowed)}")
        elif self.label is None:
            raise ValueError("'label' is required with 'builtin' or 'path': the record field that holds each prompt's class")
        return self

    def label_name(self) -> str:
        if self.label is not None:
            return self.label
        return TASK_LABELS[self.name][0] if self.name is not None else ""


@dataclass(frozen=True)
class LabelledPrompts:
    """``texts[i]`` has class ``labels[i]``; ``classes`` are the distinct labels, sorted."""

    texts: list[str]
    labels: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def class_ids(self) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[label] for label in self.labels]


def labelled_prompts(dataset: ProbeDataset, tokenizer) -> LabelledPrompts:
    """The prompts and labels of ``dataset`` (raises :class:`SpecError` naming the field at fault)."""
    from interplab.analyses.tasks import TaskError

    try:
        if dataset.name == "ioi":
            return _ioi(dataset, tokenizer)
        if dataset.name == "facts":
            return _facts(dataset, tokenizer)
    except TaskError as exc:
        raise SpecError(
            "dataset", str(exc), dataset.model_dump(exclude_defaults=True), "a dataset that fits the tokenizer"
        ) from None
    return _records(dataset)


def _ioi(dataset: ProbeDataset, tokenizer) -> LabelledPrompts:
    from interplab.analyses.tasks import ioi_pairs

    pairs = ioi_pairs(tokenizer, dataset.n, seed=dataset.seed, order=dataset.order, template=dataset.template)
    texts, labels = [], []
    for pair in pairs:
        io, s = pair.answer.strip(), pair.wrong.strip()
        texts.append(pair.clean)
        if dataset.label_name() == "io":
            labels.append(io)
        else:
            words = re.findall(r"\w+", pair.clean)
            labels.append("io_first" if words.index(io) < words.index(s) else "s_first")
    return LabelledPrompts(texts, labels)


def _facts(dataset: ProbeDataset, tokenizer) -> LabelledPrompts:
    from interplab.analyses.tasks import facts_pairs

    seen: dict[str, str] = {}
    for pair in facts_pairs(tokenizer, 10_000, seed=dataset.seed):
        seen.setdefault(pair.clean, pair.answer.strip())
    items = list(seen.items())[: dataset.n]
    return LabelledPrompts([t for t, _ in items], [a for _, a in items])


def _records(dataset: ProbeDataset) -> LabelledPrompts:
    from interplab.jobs import datasets

    if dataset.builtin is not None:
        records = datasets.builtin_records(dataset.builtin)
    else:
        records = datasets.file_records(str(dataset.path))
    if dataset.limit is not None:
        records = records[: dataset.limit]
    texts = datasets.select_field(records, dataset.field, "dataset")
    label = dataset.label_name()
    labels = []
    for i, record in enumerate(records):
        value = record.get(label) if isinstance(record, dict) else None
        if not isinstance(record, dict) or label not in record:
            raise SpecError(
                "dataset.label",
                f"record {i} of the dataset has no field {label!r}",
                label,
                "a field every record has" + (f", e.g. {', '.join(sorted(record))}" if isinstance(record, dict) else ""),
            )
        if value is None or isinstance(value, (dict, list)):
            raise SpecError(f"dataset[{i}].{label}", "a label must be a string, number or boolean", value, "a scalar")
        labels.append(str(value).strip())
    return LabelledPrompts(texts, labels)
