"""The four sub-experiments, each from the base weights θ: grafting, layer freezing, data ordering, scores.

    setting = Setting(FinetuneConfig(lr=3e-5, epochs=6, batch_size=5, seed=0), split=22, n_layers=30)
    out = run_grafting(model, data, setting, theta)
    out.evals        # rows: variant x eval set -> mean rank, mean log-prob
    out.deltas       # name -> Weights (W_F - θ, W_{F,ImplF} - W_F, W_{F'} - θ, W_{ImplF} - θ)

Every function leaves the model at θ when it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from interplab.analyses.grafting import deltas as D
from interplab.analyses.grafting.data import TaskData, require
from interplab.analyses.grafting.evaluate import evaluate
from interplab.analyses.grafting.finetune import FinetuneConfig, finetune
from interplab.analyses.grafting.weights import Weights, get_weights, set_weights

GRAFT_SETS = ("F", "ImplF", "F_prime", "ImplF_prime")
Order = Literal["joint", "facts_first", "implications_first"]
ORDERS: tuple[Order, ...] = ("joint", "facts_first", "implications_first")


@dataclass(frozen=True)
class Setting:
    """One finetuning configuration and the early/late split: early = ``[0, split)``, late = ``[split, n_layers)``."""

    config: FinetuneConfig
    split: int
    n_layers: int

    @property
    def ranges(self) -> dict[str, tuple[int, int] | None]:
        return {"all": None, "early": (0, self.split), "late": (self.split, self.n_layers)}


@dataclass
class Outcome:
    evals: list[dict] = field(default_factory=list)
    train: list[dict] = field(default_factory=list)
    deltas: dict[str, Weights] = field(default_factory=dict)


def _eval_rows(model, data: TaskData, sets: Sequence[str], **labels) -> list[dict]:
    rows = []
    for name in sets:
        result = evaluate(model, data[name])
        rows.append(
            {
                **labels,
                "eval_set": name,
                "mean_rank": result.mean_rank,
                "mean_logprob": result.mean_logprob,
                "n": len(result.ranks),
                "n_options": result.n_options,
            }
        )
    return rows


def train_logged(model, out: Outcome, examples, config: FinetuneConfig, run: str, layers=None, on_epoch=None) -> Weights:
    log = finetune(model, examples, config, layers=layers, on_epoch=on_epoch)
    out.train += [{"run": run, "step": i, "epoch": epoch, "loss": loss} for i, (epoch, loss) in enumerate(log.steps)]
    return get_weights(model)


def _start(model, weights: Weights) -> None:
    set_weights(model, weights)


def run_grafting(model, data: TaskData, setting: Setting, theta: Weights) -> Outcome:
    """W_F, W_{F,ImplF}, W_{F'}, W_{ImplF}; graft and control (all layers, early, late) evaluated on F, ImplF, F', ImplF'."""
    require(data, GRAFT_SETS, "grafting")
    out, cfg = Outcome(), setting.config
    _start(model, theta)
    w_f = train_logged(model, out, data["F"], cfg, "W_F")
    w_f_implf = train_logged(model, out, data["ImplF"], cfg, "W_F_ImplF")
    _start(model, theta)
    w_f_prime = train_logged(model, out, data["F_prime"], cfg, "W_F_prime")
    _start(model, theta)
    w_implf = train_logged(model, out, data["ImplF"], cfg, "W_ImplF")
    out.deltas = {
        "W_F-theta": D.subtract(w_f, theta),
        "W_F_ImplF-W_F": D.subtract(w_f_implf, w_f),
        "W_F_prime-theta": D.subtract(w_f_prime, theta),
        "W_ImplF-theta": D.subtract(w_implf, theta),
    }
    fixed = {"base": theta, "W_F": w_f, "W_F_ImplF": w_f_implf, "W_F_prime": w_f_prime, "W_ImplF": w_implf}
    for variant, weights in fixed.items():
        _start(model, weights)
        out.evals += _eval_rows(model, data, GRAFT_SETS, experiment="grafting", variant=variant, layers="all")
    for name, layers in setting.ranges.items():  # built one at a time: each is a full copy of the weights
        keep = D.in_layers(model, layers)
        for variant, delta in (("graft", "W_F_ImplF-W_F"), ("control", "W_ImplF-theta")):
            _start(model, D.add(w_f_prime, out.deltas[delta], keep=keep))
            out.evals += _eval_rows(model, data, GRAFT_SETS, experiment="grafting", variant=variant, layers=name)
    _start(model, theta)
    return out


def run_freezing(model, data: TaskData, setting: Setting, theta: Weights) -> Outcome:
    """Train F on all / only early / only late layers; keep only the early or late part of W_F − θ.

    Evaluated on F and ImplF (implications never trained: out-of-context reasoning)."""
    require(data, ("F", "ImplF"), "freezing")
    out, cfg = Outcome(), setting.config
    sets = ("F", "ImplF")
    _start(model, theta)
    out.evals += _eval_rows(model, data, sets, experiment="freezing", variant="base", layers="all")
    w_f = None
    for name, layers in setting.ranges.items():
        _start(model, theta)
        weights = train_logged(model, out, data["F"], cfg, f"train_{name}", layers=layers)
        out.evals += _eval_rows(model, data, sets, experiment="freezing", variant="train", layers=name)
        if layers is None:
            w_f = weights
    if w_f is None:  # not reached: Setting.ranges always has "all" (layers=None)
        raise ValueError(f"layer freezing needs a range over all layers (layers=None), got ranges {setting.ranges}")
    delta = D.subtract(w_f, theta)
    for name in ("early", "late"):
        _start(model, D.add(theta, delta, keep=D.in_layers(model, setting.ranges[name])))
        out.evals += _eval_rows(model, data, sets, experiment="freezing", variant="keep", layers=name)
    _start(model, theta)
    return out


def run_ordering(model, data: TaskData, setting: Setting, theta: Weights, orders: Sequence[str] = ORDERS) -> Outcome:
    """Phase 1 on F and ImplF (joint, facts first, or implications first); phase 2 on F_new only,
    with ImplF_new (and F_new) evaluated before phase 2 (epoch 0) and after every epoch."""
    require(data, ("F", "ImplF", "F_new", "ImplF_new"), "ordering")
    out, cfg = Outcome(), setting.config
    for order in orders:
        _start(model, theta)
        if order == "joint":
            train_logged(model, out, list(data["F"]) + list(data["ImplF"]), cfg, f"{order}:phase1")
        else:
            first, second = ("F", "ImplF") if order == "facts_first" else ("ImplF", "F")
            train_logged(model, out, data[first], cfg, f"{order}:phase1:{first}")
            train_logged(model, out, data[second], cfg, f"{order}:phase1:{second}")
        labels = {"experiment": "ordering", "variant": order, "layers": "all"}
        out.evals += _eval_rows(model, data, ("F", "ImplF", "F_new", "ImplF_new"), **labels, epoch=0)

        def on_epoch(epoch, labels=labels):
            out.evals.extend(_eval_rows(model, data, ("F_new", "ImplF_new"), **labels, epoch=epoch))

        train_logged(model, out, data["F_new"], cfg, f"{order}:phase2", on_epoch=on_epoch)
    _start(model, theta)
    return out
