"""Directions stored by earlier runs, referenced from later specs: ``{run_id, region}`` or ``{run_id, probe}``.

.. code-block:: yaml

    interventions:
      - direction: {run_id: partition-20261203T..., region: 12}    # an exemplar of a partition run
        op: ablate                                                  # x - (x . u) u at every position
      - direction: {run_id: probe-20261203T..., probe: resid_post.6}   # a probe's weight vector
        op: steer                                                   # x + coeff * u
        coeff: 4.0
        positions: [-1]

:func:`resolve_direction` looks the referenced run up, checks its kind and reads its stored vector:

* **partition** runs (``region: N``): the exemplar of region ``N`` (the ``exemplars`` table's
  ``vector``), read at the run's site;
* **probe** runs (``probe: "site.layer"``): the probe's ``weight`` row of class ``label``; a
  two-class probe without ``label`` gives its decision direction ``weight[1] - weight[0]`` (rows in
  ``class_index`` order), more classes need ``label``. Rows come from the run's table with ``site``
  and ``weight`` columns (``probe_weights``; also ``layer``, ``class``, ``class_index``), at that site.

The vector is returned as a unit direction ``u``; :func:`direction_intervention` turns a
:class:`DirectionIntervention` (a spec's entry) into an engine intervention: directional ablation
``x - (x . u) u`` or steering ``x + coeff * u``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import NonNegativeInt, model_validator

from interplab.engine.interventions import Intervention
from interplab.engine.sites import Site
from interplab.jobs.spec import StrictModel

if TYPE_CHECKING:
    from interplab.store import Store


class DirectionError(ValueError):
    """A direction reference that does not resolve (the message names the run and what it holds)."""


class DirectionRef(StrictModel):
    """A stored direction: ``{run_id, region}`` (partition) or ``{run_id, probe: "site.layer"[, label]}`` (probe)."""

    run_id: str
    region: NonNegativeInt | None = None
    probe: str | None = None
    label: str | int | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> DirectionRef:
        if (self.region is None) == (self.probe is None):
            raise ValueError(
                "give exactly one of 'region' (an exemplar of a partition run) or 'probe' (a probe's site, e.g. resid_post.6)"
            )
        if self.label is not None and self.probe is None:
            raise ValueError("'label' selects a class of a probe; it needs 'probe'")
        if self.probe is not None:
            Site.parse(self.probe)  # SiteError is a ValueError: reported at 'probe'
        return self


@dataclass(frozen=True)
class Direction:
    """A unit vector ``[d]`` and where it came from."""

    vector: np.ndarray
    site: str | None
    run_id: str
    kind: str
    what: str

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.vector, dtype=np.float32))


class DirectionIntervention(StrictModel):
    """One spec entry: ablate or steer along a stored direction, at ``site`` (default: the direction's own)."""

    direction: DirectionRef
    op: Literal["ablate", "steer"] = "ablate"
    site: str | None = None
    coeff: float = 1.0
    positions: list[int] | None = None


def resolve_direction(store: Store, ref: DirectionRef | Mapping[str, Any]) -> Direction:
    """The unit direction ``ref`` names (see the module docstring)."""
    if not isinstance(ref, DirectionRef):
        ref = DirectionRef.model_validate(dict(ref))
    info = store.run(ref.run_id)  # a StoreError names an unknown run
    if info.status != "committed":
        raise DirectionError(f"run {ref.run_id!r} is {info.status}; directions are read from committed runs")
    if ref.region is not None:
        if info.kind != "partition":
            raise DirectionError(f"run {ref.run_id!r} is a {info.kind!r} run; 'region' refers to a partition run's exemplar")
        from interplab.analyses.partition.dictionary import load_dictionary

        dictionary = load_dictionary(store, ref.run_id)
        return Direction(dictionary.direction(ref.region), dictionary.site, ref.run_id, "partition", f"region {ref.region}")
    if info.kind != "probe":
        raise DirectionError(f"run {ref.run_id!r} is a {info.kind!r} run; 'probe' refers to a probe run's weights")
    probe = ref.probe or ""
    return Direction(
        _unit(_probe_weight(store, ref.run_id, probe, ref.label, {e.table for e in info.files}), ref),
        probe,
        ref.run_id,
        "probe",
        f"probe {probe}",
    )


def _probe_weight(store: Store, run_id: str, probe: str, label: str | int | None, tables: set[str]) -> np.ndarray:
    site = Site.parse(probe)
    for table in sorted(tables - {"activations", "prompts"}):
        columns = store.sql(f"SELECT * FROM {table} WHERE run_id = $run_id LIMIT 0", {"run_id": run_id}).column_names
        if "weight" not in columns or "site" not in columns:
            continue
        rows = store.sql(f"SELECT * FROM {table} WHERE run_id = $run_id", {"run_id": run_id}).to_pylist()
        mine = [r for r in rows if _same_site(r, site)]
        if not mine:
            have = sorted({str(r["site"]) + (f".{r['layer']}" if r.get("layer") is not None else "") for r in rows})
            raise DirectionError(f"probe run {run_id!r} has no probe at {probe!r}; it has: {', '.join(have)}")
        if label is not None:
            mine = [r for r in mine if str(r.get("class")) == str(label)]
            if not mine:
                raise DirectionError(f"probe {probe!r} of run {run_id!r} has no class {label!r}")
        mine.sort(key=lambda r: r.get("class_index") or 0)
        if len(mine) == 2 and label is None:  # a binary probe: the decision direction
            return np.asarray(mine[1]["weight"], dtype=np.float32) - np.asarray(mine[0]["weight"], dtype=np.float32)
        if len(mine) > 1:
            classes = [str(r.get("class")) for r in mine]
            raise DirectionError(
                f"probe {probe!r} of run {run_id!r} has one weight per class ({', '.join(classes)}); pick one with 'label'"
            )
        return np.asarray(mine[0]["weight"], dtype=np.float32)
    raise DirectionError(f"probe run {run_id!r} holds no table of probe weights (site, weight columns)")


def _same_site(row: Mapping[str, Any], site: Site) -> bool:
    text = str(row.get("site"))
    if "." in text:
        return Site.parse(text) == site
    return text == site.kind.value and row.get("layer") == site.layer and row.get("head") in (None, site.head)


def _unit(vector: np.ndarray, ref: DirectionRef) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if norm == 0:
        raise DirectionError(f"the direction {ref.model_dump(exclude_none=True)} is the zero vector")
    return (vector / norm).astype(np.float32)


def project_out(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x - (x . u) u`` over the last axis (``u`` a unit vector): directional ablation."""
    u = u.to(device=x.device, dtype=x.dtype)
    return x - (x @ u)[..., None] * u


def direction_intervention(store: Store, entry: DirectionIntervention | Mapping[str, Any]) -> Intervention:
    """The engine intervention of a spec's ``{direction, op, site, coeff, positions}`` entry."""
    if not isinstance(entry, DirectionIntervention):
        entry = DirectionIntervention.model_validate(dict(entry))
    direction = resolve_direction(store, entry.direction)
    site = entry.site or direction.site
    if site is None:
        raise DirectionError(f"{direction.what} of run {direction.run_id!r} records no site; give 'site'")
    u = direction.tensor()
    if entry.op == "steer":
        return Intervention(Site.parse(site), "add", value=entry.coeff * u, positions=entry.positions)
    return Intervention(Site.parse(site), "apply", fn=lambda x: project_out(x, u), positions=entry.positions)
