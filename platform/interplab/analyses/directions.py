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

**In job specs.** ``capture`` and ``patching`` specs take a list of these entries as
``interventions``. The job driver resolves them against the job's store before any model is loaded
(:func:`resolve_spec_directions`; a reference that does not resolve is a :class:`SpecError` at
``interventions[i].direction.<field>``), checks each one's site and width against the model
(:func:`check_direction_sites`), and records the runs they read as the new run's ``inputs``, so a
retention sweep keeps them. Workers build the engine interventions with :func:`spec_interventions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import NonNegativeInt, model_validator

from interplab.jobs.errors import SpecError, check_positions
from interplab.jobs.spec import StrictModel

if TYPE_CHECKING:  # torch and the engine load when a direction is used, not when a spec is parsed
    import torch

    from interplab.engine.interventions import Intervention
    from interplab.engine.sites import Site
    from interplab.store import Store


class DirectionError(ValueError):
    """A direction reference that does not resolve (the message names the run and what it holds);
    ``field`` is the reference's key at fault (``run_id``, ``region``, ``probe`` or ``label``)."""

    def __init__(self, message: str, field: str = "run_id"):
        self.field = field
        super().__init__(message)


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
            from interplab.engine.sites import Site

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
        import torch

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
        raise DirectionError(f"run {ref.run_id!r} is {info.status}; directions are read from committed runs", "run_id")
    if ref.region is not None:
        if info.kind != "partition":
            raise DirectionError(
                f"run {ref.run_id!r} is a {info.kind!r} run; 'region' refers to a partition run's exemplar", "run_id"
            )
        from interplab.analyses.partition.dictionary import load_dictionary

        dictionary = load_dictionary(store, ref.run_id)
        return Direction(dictionary.direction(ref.region), dictionary.site, ref.run_id, "partition", f"region {ref.region}")
    if info.kind != "probe":
        raise DirectionError(f"run {ref.run_id!r} is a {info.kind!r} run; 'probe' refers to a probe run's weights", "run_id")
    probe = ref.probe or ""
    return Direction(
        _unit(_probe_weight(store, ref.run_id, probe, ref.label, {e.table for e in info.files}), ref),
        probe,
        ref.run_id,
        "probe",
        f"probe {probe}",
    )


def _probe_weight(store: Store, run_id: str, probe: str, label: str | int | None, tables: set[str]) -> np.ndarray:
    from interplab.engine.sites import Site

    site = Site.parse(probe)
    for table in sorted(tables - {"activations", "prompts"}):
        columns = store.sql(f"SELECT * FROM {table} WHERE run_id = $run_id LIMIT 0", {"run_id": run_id}).column_names
        if "weight" not in columns or "site" not in columns:
            continue
        rows = store.sql(f"SELECT * FROM {table} WHERE run_id = $run_id", {"run_id": run_id}).to_pylist()
        mine = [r for r in rows if _same_site(r, site)]
        if not mine:
            have = sorted({str(r["site"]) + (f".{r['layer']}" if r.get("layer") is not None else "") for r in rows})
            raise DirectionError(f"probe run {run_id!r} has no probe at {probe!r}; it has: {', '.join(have)}", "probe")
        if label is not None:
            mine = [r for r in mine if str(r.get("class")) == str(label)]
            if not mine:
                raise DirectionError(f"probe {probe!r} of run {run_id!r} has no class {label!r}", "label")
        mine.sort(key=lambda r: r.get("class_index") or 0)
        if len(mine) == 2 and label is None:  # a binary probe: the decision direction
            return np.asarray(mine[1]["weight"], dtype=np.float32) - np.asarray(mine[0]["weight"], dtype=np.float32)
        if len(mine) > 1:
            classes = [str(r.get("class")) for r in mine]
            raise DirectionError(
                f"probe {probe!r} of run {run_id!r} has one weight per class ({', '.join(classes)}); pick one with 'label'",
                "label",
            )
        return np.asarray(mine[0]["weight"], dtype=np.float32)
    raise DirectionError(f"probe run {run_id!r} holds no table of probe weights (site, weight columns)", "run_id")


def _same_site(row: Mapping[str, Any], site: Site) -> bool:
    from interplab.engine.sites import Site

    text = str(row.get("site"))
    if "." in text:
        return Site.parse(text) == site
    return text == site.kind.value and row.get("layer") == site.layer and row.get("head") in (None, site.head)


def _unit(vector: np.ndarray, ref: DirectionRef) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if norm == 0:
        raise DirectionError(f"the direction {ref.model_dump(exclude_none=True)} is the zero vector", "probe")
    return (vector / norm).astype(np.float32)


def project_out(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x - (x . u) u`` over the last axis (``u`` a unit vector): directional ablation."""
    u = u.to(device=x.device, dtype=x.dtype)
    return x - (x @ u)[..., None] * u


def direction_intervention(store: Store, entry: DirectionIntervention | Mapping[str, Any]) -> Intervention:
    """The engine intervention of a spec's ``{direction, op, site, coeff, positions}`` entry."""
    from interplab.engine.interventions import Intervention
    from interplab.engine.sites import Site

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


# -- ``interventions:`` in job specs ---------------------------------------------------------------

_ALLOWED_RUN = "a committed partition run (with region) or probe run (with probe) of the job's store (interplab runs)"
_ALLOWED_FIELD = {
    "probe": "a site the probe run has a probe at (SELECT DISTINCT site, layer FROM probe_weights WHERE run_id = ...)",
    "label": "a class of that probe (SELECT DISTINCT class FROM probe_weights WHERE run_id = ...)",
}
_WIDTH_AXES = {"d_model": "d_model", "d_head": "head_dim", "d_mlp": "d_mlp", "vocab": "d_vocab"}


@dataclass(frozen=True)
class ResolvedEntry:
    """A spec's ``interventions[index]`` with the direction it names."""

    index: int
    entry: DirectionIntervention
    direction: Direction

    @property
    def site(self) -> str | None:
        return self.entry.site or self.direction.site


def spec_entries(spec: Any) -> list[DirectionIntervention]:
    """The spec's ``interventions`` (none for a kind without the field)."""
    return list(getattr(spec, "interventions", None) or [])


def resolve_spec_directions(spec: Any, store_uri: str) -> list[ResolvedEntry]:
    """Resolve every ``interventions`` entry of ``spec`` against the store at ``store_uri`` (reads
    the store only; no model). A reference that does not resolve is a :class:`SpecError` at
    ``interventions[i].direction.<field>`` naming the run and what it holds."""
    entries = spec_entries(spec)
    if not entries:
        return []
    from interplab.analyses.partition.dictionary import DictionaryError
    from interplab.store import StoreError, open_store

    try:
        store = open_store(store_uri, create=False)
    except StoreError as exc:
        raise SpecError(
            "interventions[0].direction.run_id",
            f"run {entries[0].direction.run_id!r} cannot be read: {exc}",
            entries[0].direction.run_id,
            _ALLOWED_RUN,
        ) from None
    out = []
    for i, entry in enumerate(entries):
        ref = entry.direction
        path = f"interventions[{i}].direction"
        try:
            direction = resolve_direction(store, ref)
        except StoreError as exc:
            raise SpecError(f"{path}.run_id", str(exc), ref.run_id, _ALLOWED_RUN) from None
        except DirectionError as exc:
            allowed = _ALLOWED_FIELD.get(exc.field, _ALLOWED_RUN)
            raise SpecError(f"{path}.{exc.field}", str(exc), getattr(ref, exc.field), allowed) from None
        except DictionaryError as exc:
            raise SpecError(f"{path}.region", f"run {ref.run_id!r}: {exc}", ref.region, "a region of that dictionary") from None
        out.append(ResolvedEntry(i, entry, direction))
    return out


def check_direction_sites(resolved: list[ResolvedEntry], model: Any, *, served: bool = False) -> None:
    """Each resolved entry's site exists in ``model`` and is as wide as its direction; a served model
    (``served``) takes steering only, since ablation is a function of the activation (SpecError otherwise)."""
    for item in resolved:
        path = f"interventions[{item.index}]"
        if served and item.entry.op == "ablate":
            raise SpecError(
                f"{path}.op",
                "a served model applies no function interventions, and ablation projects each activation",
                item.entry.op,
                "steer with a served model; ablate with a local model",
            )
        site_path = f"{path}.site" if item.entry.site else f"{path}.direction"
        if item.site is None:
            raise SpecError(
                f"{path}.site",
                f"{item.direction.what} of run {item.direction.run_id!r} records no site",
                None,
                "a site, e.g. resid_post.6",
            )
        from interplab.engine.sites import SiteError

        try:
            site = model.validate_site(item.site)
        except SiteError as exc:
            raise SpecError(site_path, str(exc), item.site, "a site of this model (list them: interplab sites MODEL)") from None
        if not site.kind.fixed_width:
            raise SpecError(
                site_path, "a direction cannot act on attention patterns", item.site, "resid_*, attn_out, mlp_out, z, ..."
            )
        axis = site.kind.layout[-1]
        width = getattr(model, _WIDTH_AXES.get(axis, axis), None)
        d = int(item.direction.vector.shape[-1])
        if isinstance(width, int) and width != d:
            raise SpecError(
                site_path,
                f"{item.direction.what} of run {item.direction.run_id!r} has {d} dimensions; {item.site} has {width} ({axis})",
                item.site,
                f"a site of width {d}",
            )


def check_direction_positions(spec: Any, lengths: Sequence[int], where: str) -> None:
    """Each ``interventions[i].positions`` lies within every prompt (``lengths``: their token counts;
    ``where``: the spec field they come from), or one SpecError naming the entry."""
    for i, entry in enumerate(spec_entries(spec)):
        check_positions(f"interventions[{i}].positions", entry.positions or (), lengths, where)


def spec_interventions(spec: Any, store: Store) -> list[Intervention]:
    """The engine interventions of ``spec.interventions`` (in order), read from ``store``."""
    return [direction_intervention(store, entry) for entry in spec_entries(spec)]
