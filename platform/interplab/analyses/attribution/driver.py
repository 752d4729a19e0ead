"""``attribute``: ItP and/or HiPe attributions of one prompt's target, and their rows for the store."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from interplab.analyses.attribution.inputs import AttributionTask, Unit, build_task
from interplab.analyses.attribution.methods import Keep, UnitScores, hipe, itp
from interplab.analyses.attribution.perturb import Cost, Mode, Perturber

Method = Literal["itp", "hipe"]


@dataclass(frozen=True)
class HipeConfig:
    """HiPe's knobs (see :func:`interplab.analyses.attribution.methods.hipe`)."""

    first_window: int | None = None
    overlap: float = 0.5
    threshold: float | None = None  # None: mid-range
    min_effect: float = 1e-3
    keep: Keep = "drop"


@dataclass(frozen=True)
class Attribution:
    """One method's attributions of one prompt: per-unit scores, the unperturbed log-prob and the cost."""

    task: AttributionTask
    method: Method
    perturbation: Mode
    scores: UnitScores
    base_logprob: float
    cost: Cost
    seconds: float

    def token_rows(self, prompt_id: int = 0) -> list[dict]:
        """One row per prompt token (its unit's attribution; None for tokens in no unit)."""
        unit_of = self.task.unit_of()
        rows = []
        for p, (token_id, piece) in enumerate(zip(self.task.prompt_ids, self.task.pieces)):
            u = unit_of[p]
            rows.append(
                {
                    "prompt_id": prompt_id,
                    "method": self.method,
                    "position": p,
                    "token_id": token_id,
                    "token": piece,
                    "unit": u,
                    "attribution": None if u is None else self.scores.attribution[u],
                    "window": None if u is None else self.scores.window[u],
                    "level": None if u is None else self.scores.level[u],
                }
            )
        return rows

    def summary_row(self, prompt_id: int = 0) -> dict:
        return {
            "prompt_id": prompt_id,
            "method": self.method,
            "prompt": self.task.prompt,
            "target": self.task.target,
            "perturbation": self.perturbation,
            "n_tokens": self.task.n_tokens,
            "n_units": self.task.n_units,
            "base_logprob": self.base_logprob,
            "forwards": self.cost.forwards,
            "passes": self.cost.passes,
            "rounds": self.cost.rounds,
            "seconds": self.seconds,
        }


def attribute(
    model,
    prompt: str | AttributionTask,
    target: str = "",
    *,
    method: Method = "hipe",
    perturbation: Mode = "mean",
    unit: Unit = "token",
    baseline_id: int | None = None,
    max_rows: int | None = None,
    config: HipeConfig | None = None,
) -> Attribution:
    """Attribute ``target``'s log-prob given ``prompt`` to the prompt's units.

    ``model`` is any backend (``run``, ``tokenizer``); ``baseline_id`` is the replacement token of
    ``perturbation="baseline"`` (default: the tokenizer's pad token, else its EOS token)."""
    task = prompt if isinstance(prompt, AttributionTask) else build_task(model.tokenizer, prompt, target, unit)
    if perturbation == "baseline" and baseline_id is None:
        from interplab.engine.tokens import pad_id

        baseline_id = pad_id(model.tokenizer)
    perturber = Perturber(model, task, perturbation, baseline_id=baseline_id, max_rows=max_rows)
    started = time.perf_counter()
    if method == "itp":
        scores = itp(perturber.attributions, task.n_units)
    elif method == "hipe":
        c = config or HipeConfig()
        scores = hipe(
            perturber.attributions,
            task.n_units,
            first_window=c.first_window,
            overlap=c.overlap,
            threshold=c.threshold,
            min_effect=c.min_effect,
            keep=c.keep,
        )
    else:
        raise ValueError(f"unknown method {method!r}; use itp or hipe")
    seconds = time.perf_counter() - started
    if perturber.base is None:  # every method runs at least one round
        raise RuntimeError("no round ran")
    return Attribution(task, method, perturbation, scores, perturber.base, perturber.cost, seconds)


def default_max_rows(model, n_tokens: int, n_target: int, memory_mb: int) -> int:
    """Rows per forward pass that fit ``memory_mb`` (a rough bound on one row's activations and logits)."""
    s = n_tokens + n_target - 1
    per_row = 4 * s * (12 * model.d_model + 3 * model.d_mlp + model.n_heads * s)
    per_row += 4 * model.d_vocab * (s if n_target > 1 else 1)
    return max(1, (memory_mb << 20) // per_row)
