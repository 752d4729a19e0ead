"""Perturbed variants of a prompt, run as batched forward passes, scored by the target's log-prob.

One call of :meth:`Perturber.attributions` is one *round*: every variant (a set of units removed
together) is a row of one batched forward pass (split into passes of at most ``max_rows`` rows when
a memory bound asks for it). The perturbations:

* ``baseline``: the units' tokens are replaced by a baseline token (the input ids change);
* ``zero`` / ``mean``: the units' embeddings (site ``embed``) are set to zero or to the mean of the
  prompt's unit embeddings, with one paired per-row intervention (exact: no other row changes);
* ``delete``: the units' tokens are removed; shorter rows are right-padded and masked, and the
  target's log-probs are read at each row's own positions.

The measure is ``log p(target | prompt)``, summed over the target's tokens; an attribution is the
drop it suffers, ``log p(target | prompt) - log p(target | perturbed prompt)`` (positive: the units
support the target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from interplab.analyses.attribution.inputs import AttributionTask
from interplab.engine.interventions import set_to
from interplab.engine.tokens import TokenBatch, pad_id

Mode = Literal["baseline", "zero", "mean", "delete"]
MODES: tuple[str, ...] = ("baseline", "zero", "mean", "delete")


@dataclass
class Cost:
    """What the attribution of one prompt cost: perturbed rows run (``forwards``, the unperturbed one
    included), batched backend calls (``passes``) and rounds (one per level; ItP has one)."""

    forwards: int = 0
    passes: int = 0
    rounds: int = 0
    rows_per_round: list[int] = field(default_factory=list)


class Perturber:
    """Scores sets of units of one :class:`AttributionTask` on a backend (see the module docstring)."""

    def __init__(
        self,
        model,
        task: AttributionTask,
        mode: Mode = "baseline",
        *,
        baseline_id: int | None = None,
        max_rows: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown perturbation {mode!r}; use one of {', '.join(MODES)}")
        if mode == "baseline" and baseline_id is None:
            raise ValueError("perturbation 'baseline' needs baseline_id (the replacement token)")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 (or None: every round in one pass), got {max_rows}")
        self.model = model
        self.task = task
        self.mode = mode
        self.baseline_id = baseline_id
        self.max_rows = max_rows
        self.pad = pad_id(model.tokenizer)
        self.cost = Cost()
        self.base: float | None = None
        self._mean: torch.Tensor | None = None

    # ------------------------------------------------------------------ rounds
    def attributions(self, variants: Sequence[Sequence[int]]) -> list[float]:
        """One round: the attribution (log-prob drop) of removing each set of units in ``variants``.

        The first round also runs the unperturbed prompt, in the same batch."""
        sets = [sorted(set(v)) for v in variants]
        bad = [u for s in sets for u in s if not 0 <= u < self.task.n_units]
        if bad:
            raise ValueError(f"unit {bad[0]} out of range: the prompt has {self.task.n_units} units")
        rows: list[list[int]] = ([[]] if self.base is None else []) + sets
        scores = self.logprobs(rows)
        self.cost.rounds += 1
        self.cost.rows_per_round.append(len(rows))
        if self.base is None:
            self.base, scores = scores[0], scores[1:]
        return [self.base - s for s in scores]

    def logprobs(self, variants: Sequence[Sequence[int]]) -> list[float]:
        """``log p(target | prompt with the units of each variant perturbed)``, in passes of at most
        ``max_rows`` rows (None: all in one)."""
        out: list[float] = []
        step = self.max_rows or max(1, len(variants))
        for start in range(0, len(variants), step):
            out += self._pass(variants[start : start + step])
        return out

    # ------------------------------------------------------------------ one pass
    def _pass(self, variants: Sequence[Sequence[int]]) -> list[float]:
        task = self.task
        prompt, context = list(task.prompt_ids), list(task.target_ids[:-1])
        baseline = self.baseline_id if self.baseline_id is not None else self.pad  # set whenever mode is baseline
        rows: list[list[int]] = []
        pairs_rows: list[int] = []
        pairs_pos: list[int] = []
        for r, units in enumerate(variants):
            removed = set(task.positions(units))
            if self.mode == "delete":
                rows.append([t for p, t in enumerate(prompt) if p not in removed] + context)
                if not rows[-1]:
                    raise ValueError(
                        "deleting every token of the prompt leaves nothing to predict the target from; "
                        "use another perturbation, or perturb fewer units at once (hipe first_window)"
                    )
            elif self.mode == "baseline":
                rows.append([baseline if p in removed else t for p, t in enumerate(prompt)] + context)
            else:
                rows.append(prompt + context)
                pairs_rows += [r] * len(removed)
                pairs_pos += sorted(removed)
        batch = TokenBatch.from_ids(rows, self.pad)
        interventions = []
        if pairs_rows:
            value = 0.0 if self.mode == "zero" else self.mean_embedding()
            interventions.append(set_to("embed", value, rows=pairs_rows, positions=pairs_pos, paired=True))
        n_target = len(task.target_ids)
        result = self.model.run(batch, interventions=interventions, logits="last" if n_target == 1 else "all")
        self.cost.forwards += len(rows)
        self.cost.passes += 1
        logits = result.logits
        if logits is None:  # the backend returns logits for logits="last"/"all"
            raise RuntimeError("the backend returned no logits")
        target = torch.as_tensor(task.target_ids, dtype=torch.long)
        if n_target == 1:
            logp = torch.log_softmax(logits.float(), dim=-1)[:, int(target[0])]
            return [float(v) for v in logp.cpu()]
        lengths = batch.lengths.to(logits.device)
        offsets = torch.arange(n_target, device=logits.device)
        positions = lengths[:, None] - n_target + offsets[None, :]  # [b, T]: the positions that predict the target
        picked = logits[torch.arange(len(rows), device=logits.device)[:, None], positions].float()  # [b, T, V]
        logp = torch.log_softmax(picked, dim=-1).gather(2, target.to(logits.device)[None, :, None].expand(len(rows), -1, 1))
        return [float(v) for v in logp[..., 0].sum(dim=1).cpu()]

    def mean_embedding(self) -> torch.Tensor:
        """The mean ``embed`` activation over the prompt's unit positions (computed once, embedding only)."""
        if self._mean is None:
            positions = self.task.positions(range(self.task.n_units))
            batch = TokenBatch.from_ids([list(self.task.prompt_ids)], self.pad)
            out = self.model.run(batch, capture=["embed"], logits="none")
            self._mean = out.cache["embed"][0, positions].float().mean(dim=0)
        return self._mean
