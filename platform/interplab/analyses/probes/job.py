"""The ``probe`` job kind: linear (logistic-regression) probes, one per (site, layer).

.. code-block:: yaml

    kind: probe
    model: smollm2-135m
    dataset: {name: ioi, n: 256, seed: 0}   # label io (default) | order; or {name: facts}
                                            # or {path: prompts.jsonl, label: city} / {builtin: ioi, label: answer}
    sites: [resid_post]                     # a kind = every layer; or resid_post.7
    position: -1                            # the token probed (negative counts from each prompt's end)
    activations_run: capture-2026...        # optional: read a committed capture run of the same prompts
    test_fraction: 0.25                     # held-out rows, a stratified split seeded by ``seed``
    l2: 0.01                                # weight decay on the standardised weights

One chunk per entry of ``sites``: its activations (read from ``activations_run`` in the job's store,
or captured in-process) and one probe per layer, fitted with ``torch.optim.LBFGS``
(:mod:`.fit`). Rows land in ``probes`` (accuracy per layer) and ``probe_weights`` (one row per
class: its direction ``weight`` in raw activation space and ``bias``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from interplab.analyses.probes.features import captured_features, check_input_run, stored_features
from interplab.analyses.probes.fit import accuracy, cross_entropy, fit_probe, split_rows
from interplab.analyses.probes.labels import LabelledPrompts, ProbeDataset, labelled_prompts
from interplab.analyses.probes.tables import probe_rows, probes_table, weights_table
from interplab.engine.sites import Site, SiteError, SiteKind
from interplab.jobs.errors import SpecError, at_path
from interplab.jobs.registry import JobSummary
from interplab.jobs.spec import JobSpec

if TYPE_CHECKING:
    from interplab.engine.backend import Backend
    from interplab.store.writer import RunWriter

PROBE_KINDS = tuple(k.value for k in SiteKind if not k.per_head and k.fixed_width and k is not SiteKind.LOGITS)


class ProbeSpec(JobSpec):
    kind: Literal["probe"]
    dataset: ProbeDataset
    sites: list[str] = Field(default_factory=lambda: ["resid_post"], min_length=1)
    position: int = -1
    activations_run: str | None = None
    test_fraction: float = Field(default=0.25, ge=0.0, lt=1.0)
    l2: PositiveFloat = 1e-2
    max_iter: PositiveInt = 300

    @field_validator("sites")
    @classmethod
    def _sites(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            kind = text.split(".")[0]
            if kind not in PROBE_KINDS:
                raise ValueError(
                    f"sites[{i}] = {text!r}: probes read whole-stream sites; allowed kinds: {', '.join(PROBE_KINDS)}"
                )
            try:
                Site.parse(text) if "." in text else Site(kind, 0 if SiteKind(kind).layered else None)
            except SiteError as exc:
                raise ValueError(f"sites[{i}]: {exc}") from None
        if len(set(value)) != len(value):
            raise ValueError("sites must not repeat")
        return value


def expand_sites(entry: str, n_layers: int) -> list[Site]:
    """``resid_post`` -> every layer's site; ``resid_post.3`` -> that one; ``embed`` -> itself."""
    if "." in entry:
        return [Site.parse(entry)]
    kind = SiteKind(entry)
    return [Site(kind, layer) for layer in range(n_layers)] if kind.layered else [Site(kind)]


@lru_cache(maxsize=4)
def _prompts(dataset_json: str, tokenizer_id: int, tokenizer) -> LabelledPrompts:
    return labelled_prompts(ProbeDataset.model_validate_json(dataset_json), tokenizer)


def spec_prompts(spec: ProbeSpec, model) -> LabelledPrompts:
    """The labelled prompts of ``spec`` (cached per dataset and tokenizer)."""
    return _prompts(spec.dataset.model_dump_json(), id(model.tokenizer), model.tokenizer)


class ProbeRunner:
    """Runner of the ``probe`` kind (protocol: :mod:`interplab.jobs.registry`)."""

    def validate(self, spec: ProbeSpec, model) -> None:
        for i, entry in enumerate(spec.sites):
            for site in expand_sites(entry, model.n_layers)[:1] + expand_sites(entry, model.n_layers)[-1:]:
                with at_path(f"sites[{i}]", entry, "sites of this model (list them: interplab sites MODEL)"):
                    model.validate_site(site)
        prompts = spec_prompts(spec, model)
        classes = prompts.classes
        if len(classes) < 2:
            raise SpecError(
                "dataset.label",
                f"every prompt has the same label {classes[0]!r}" if classes else "the dataset has no prompts",
                spec.dataset.label_name(),
                "a label with at least 2 classes",
            )
        train, test = split_rows(torch.tensor(prompts.class_ids()), spec.test_fraction, spec.seed)
        if spec.test_fraction > 0 and len(test) == 0:
            raise SpecError(
                "test_fraction",
                f"no prompt is held out: {len(prompts.texts)} prompts in {len(classes)} classes",
                spec.test_fraction,
                "more prompts per class, or a larger test_fraction",
            )
        lengths = model.tokenize(prompts.texts).lengths
        shortest = int(lengths.argmin())
        n = int(lengths[shortest])
        if not -n <= spec.position < n:
            raise SpecError(
                "position",
                f"out of range for dataset prompt {shortest}, which has {n} tokens",
                spec.position,
                f"{-n}..{n - 1} (negative counts from each prompt's end)",
            )

    def chunks(self, spec: ProbeSpec, model) -> list[str]:
        return list(spec.sites)

    def prompt_texts(self, spec: ProbeSpec, model) -> list[tuple[str, str]]:
        """``(field path, text)`` of every prompt (the job driver checks them against the model's context)."""
        return [(f"dataset[{i}]", text) for i, text in enumerate(spec_prompts(spec, model).texts)]

    def run_chunk(self, spec: ProbeSpec, model: Backend, chunk_id: str, writer: RunWriter) -> None:
        prompts = spec_prompts(spec, model)
        sites = expand_sites(chunk_id, model.n_layers)
        if spec.activations_run is not None:
            check_input_run(writer.store, spec.activations_run, model, spec.model, prompts.texts)
            features = stored_features(writer.store, spec.activations_run, sites, spec.position, len(prompts.texts))
        else:
            features = captured_features(model, prompts.texts, sites, spec.position, spec.batch_size)
        results = train_probes(features, prompts, spec)
        writer.write_table("probes", probes_table(results), chunk=chunk_id)
        writer.write_table("probe_weights", weights_table(results), chunk=chunk_id)

    def finalize(self, spec: ProbeSpec, model, writer) -> JobSummary:
        prompts = spec_prompts(spec, model)
        source = f"activations of run {spec.activations_run}" if spec.activations_run else "activations captured in-process"
        return JobSummary(
            lines=[
                f"probes of label {spec.dataset.label_name()!r} ({len(prompts.classes)} classes, {len(prompts.texts)} prompts) "
                f"on {', '.join(spec.sites)} at position {spec.position}, from {source}",
                "accuracy by layer: interplab plot {run_id} -o probes.png",
            ],
            sql=[
                "SELECT site, layer, round(train_accuracy, 3) AS train, round(test_accuracy, 3) AS test, "
                "round(majority, 3) AS majority FROM probes WHERE run_id = '{run_id}' ORDER BY site, layer",
                "SELECT site, layer, class, bias, len(weight) AS d FROM probe_weights WHERE run_id = '{run_id}' "
                "ORDER BY site, layer, class LIMIT 10",
            ],
        )

    def provenance(self, spec: ProbeSpec) -> dict[str, Any]:
        inputs = [spec.activations_run] if spec.activations_run else []
        return {"inputs": inputs, "label": spec.dataset.label_name()}


def train_probes(features: dict[Site, torch.Tensor], prompts: LabelledPrompts, spec: ProbeSpec) -> list[dict]:
    """One fitted probe per site of ``features``, on the spec's seeded split; rows for the tables."""
    y = torch.tensor(prompts.class_ids())
    train, test = split_rows(y, spec.test_fraction, spec.seed)
    classes = prompts.classes
    counts = torch.bincount(y[train], minlength=len(classes))
    majority_class = int(counts.argmax())
    results = []
    for site, x in features.items():
        fit = fit_probe(x[train], y[train], len(classes), l2=spec.l2, max_iter=spec.max_iter)
        results.append(
            probe_rows(
                site,
                fit,
                classes,
                train_accuracy=accuracy(fit, x[train], y[train]),
                test_accuracy=accuracy(fit, x[test], y[test]),
                train_loss=cross_entropy(fit, x[train], y[train]),
                test_loss=cross_entropy(fit, x[test], y[test]),
                majority=float((y[test] == majority_class).double().mean()) if len(test) else float("nan"),
                n_train=len(train),
                n_test=len(test),
                spec=spec,
            )
        )
    return results
