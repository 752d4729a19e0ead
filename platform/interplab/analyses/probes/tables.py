"""The probe kind's store tables, and reading probes back.

``probes``: one row per (site, layer): ``site`` (the kind, e.g. ``resid_post``), ``layer`` (NULL for
``embed``/``final``), ``position``, ``label``, ``n_classes``, ``d``, ``n_train``, ``n_test``,
``train_accuracy``, ``test_accuracy``, ``train_loss``, ``test_loss`` (mean cross-entropy, nats),
``majority`` (test accuracy of always answering the most frequent training class), ``l2``,
``iterations`` and ``grad_norm`` (LBFGS's work and the objective's gradient max-norm at the end).

``probe_weights``: one row per (site, layer, class): ``class`` (the label text), ``class_index``
(its row in the probe), ``weight`` (``list<float>``: the class's direction in raw activation space,
``d`` numbers), ``bias`` and ``norm`` (the weight's L2 norm). The logits of activation ``x`` are
``weight . x + bias`` per class; for two classes ``weight[1] - weight[0]`` is the decision direction.

:func:`load_probe` reads one probe back as tensors; :func:`save_safetensors` writes every probe of a
run to one ``.safetensors`` file (``<site>.<layer>.weight`` ``[K, d]``, ``.bias`` ``[K]``, the
classes in the file's metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from interplab.engine.sites import Site

if TYPE_CHECKING:
    from interplab.analyses.probes.fit import ProbeFit
    from interplab.store import Store

PROBES_SCHEMA = pa.schema(
    [
        ("site", pa.string()),
        ("layer", pa.int32()),
        ("position", pa.int32()),
        ("label", pa.string()),
        ("n_classes", pa.int32()),
        ("d", pa.int32()),
        ("n_train", pa.int32()),
        ("n_test", pa.int32()),
        ("train_accuracy", pa.float64()),
        ("test_accuracy", pa.float64()),
        ("train_loss", pa.float64()),
        ("test_loss", pa.float64()),
        ("majority", pa.float64()),
        ("l2", pa.float64()),
        ("iterations", pa.int32()),
        ("grad_norm", pa.float64()),
    ]
)
WEIGHTS_SCHEMA = pa.schema(
    [
        ("site", pa.string()),
        ("layer", pa.int32()),
        ("class", pa.string()),
        ("class_index", pa.int32()),
        ("weight", pa.list_(pa.float32())),
        ("bias", pa.float64()),
        ("norm", pa.float64()),
    ]
)


def probe_rows(
    site: Site,
    fit: ProbeFit,
    classes: list[str],
    *,
    train_accuracy: float,
    test_accuracy: float,
    train_loss: float,
    test_loss: float,
    majority: float,
    n_train: int,
    n_test: int,
    spec: Any,
) -> dict[str, Any]:
    """The ``probes`` row and ``probe_weights`` rows of one fitted probe: ``{"probe": row, "weights": rows}``."""
    probe = {
        "site": site.kind.value,
        "layer": site.layer,
        "position": spec.position,
        "label": spec.dataset.label_name(),
        "n_classes": len(classes),
        "d": int(fit.weight.shape[1]),
        "n_train": n_train,
        "n_test": n_test,
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "majority": majority,
        "l2": spec.l2,
        "iterations": fit.iterations,
        "grad_norm": fit.grad_norm,
    }
    weights = [
        {
            "site": site.kind.value,
            "layer": site.layer,
            "class": name,
            "class_index": k,
            "weight": fit.weight[k].float().tolist(),
            "bias": float(fit.bias[k]),
            "norm": float(fit.weight[k].norm()),
        }
        for k, name in enumerate(classes)
    ]
    return {"probe": probe, "weights": weights}


def probes_table(results: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([r["probe"] for r in results], schema=PROBES_SCHEMA)


def weights_table(results: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([w for r in results for w in r["weights"]], schema=WEIGHTS_SCHEMA)


@dataclass(frozen=True)
class StoredProbe:
    """One probe of a committed run: ``logits = x @ weight.T + bias``; ``classes[k]`` names row ``k``."""

    site: Site
    classes: list[str]
    weight: torch.Tensor  # Float[K, d]
    bias: torch.Tensor  # Float[K]

    def direction(self, cls: str | None = None) -> torch.Tensor:
        """``Float[d]``: the row of class ``cls``; with two classes and no ``cls``, ``weight[1] - weight[0]``."""
        if cls is None:
            if len(self.classes) != 2:
                raise ValueError(f"probe {self.site} has {len(self.classes)} classes; name one of {self.classes}")
            return self.weight[1] - self.weight[0]
        if cls not in self.classes:
            raise KeyError(f"probe {self.site} has no class {cls!r}; classes: {self.classes}")
        return self.weight[self.classes.index(cls)]


def load_probe(store: Store, run_id: str, site: Site | str) -> StoredProbe:
    """The probe of ``site`` (``resid_post.7``) in committed probe run ``run_id``."""
    site = Site.parse(site)
    rows = store.sql(
        "SELECT class, class_index, weight, bias FROM probe_weights WHERE run_id = $run AND site = $site "
        "AND layer IS NOT DISTINCT FROM $layer ORDER BY class_index",
        {"run": run_id, "site": site.kind.value, "layer": site.layer},
    ).to_pylist()
    if not rows:
        have = store.sql(
            "SELECT DISTINCT site, layer FROM probe_weights WHERE run_id = $run ORDER BY site, layer", {"run": run_id}
        ).to_pylist()
        names = [r["site"] + ("" if r["layer"] is None else f".{r['layer']}") for r in have]
        raise KeyError(f"run {run_id!r} has no probe at {site}; it has: {', '.join(names) or 'none'}")
    weight = torch.tensor([r["weight"] for r in rows], dtype=torch.float32)
    bias = torch.tensor([r["bias"] for r in rows], dtype=torch.float64)
    return StoredProbe(site, [r["class"] for r in rows], weight, bias)


def save_safetensors(store: Store, run_id: str, path: str | Path) -> Path:
    """Write every probe of committed run ``run_id`` to one safetensors file at ``path``."""
    from safetensors.torch import save_file

    rows = store.sql(
        "SELECT site, layer, class, weight, bias FROM probe_weights WHERE run_id = $run ORDER BY site, layer, class_index",
        {"run": run_id},
    ).to_pylist()
    if not rows:
        raise KeyError(f"run {run_id!r} has no probe_weights rows")
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["site"] + ("" if r["layer"] is None else f".{r['layer']}"), []).append(r)
    tensors, classes = {}, {}
    for name, members in groups.items():
        tensors[f"{name}.weight"] = torch.tensor([m["weight"] for m in members], dtype=torch.float32)
        tensors[f"{name}.bias"] = torch.tensor([m["bias"] for m in members], dtype=torch.float32)
        classes[name] = [m["class"] for m in members]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"run_id": run_id, "classes": json.dumps(classes)})
    return out
