"""Sweeps: which site kind is patched, and over which axes (layer, position, head).

``Sweep("resid_pre")`` patches every layer x position; ``Sweep("z", ("layer", "head"))`` every
head of every layer at all positions at once; ``Sweep("z", ("layer", "position", "head"))`` every
head at every position. :func:`parse_sweeps` reads the spec forms ``resid_pre``,
``[resid_pre, attn_out]``, ``{site: head_out, by: [layer, head]}``, ``every_block`` and ``every_head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from interplab.engine.sites import Site, SiteKind

STREAM_AXES = (("layer", "position"), ("layer",))
HEAD_AXES = (("layer", "head"), ("layer", "position", "head"), ("layer",), ("layer", "position"))
SWEEPABLE = tuple(k.value for k in SiteKind if k.layered)
EVERY_BLOCK = ("resid_pre", "attn_out", "mlp_out")
EVERY_HEAD = ("z", "q", "k", "v", "pattern")


class SweepError(ValueError):
    """A sweep that cannot be run (unknown site kind, axes that do not fit the kind)."""


@dataclass(frozen=True)
class Patch:
    """One patch of a sweep: ``position``/``head`` are None where the patch covers all of them."""

    layer: int
    position: int | None
    head: int | None


@dataclass(frozen=True)
class Sweep:
    kind: SiteKind
    by: tuple[str, ...]

    def __init__(self, kind: SiteKind | str, by: tuple[str, ...] | list[str] | None = None):
        try:
            kind = SiteKind(kind)
        except ValueError:
            raise SweepError(f"unknown sweep site {kind!r}; sweepable sites: {', '.join(SWEEPABLE)}") from None
        if not kind.layered:
            raise SweepError(f"cannot sweep {kind.value!r}: it has no layers; sweepable sites: {', '.join(SWEEPABLE)}")
        allowed = HEAD_AXES if kind.per_head else STREAM_AXES
        by = tuple(by) if by is not None else allowed[0]
        if by not in allowed:
            raise SweepError(
                f"sweep {kind.value!r} cannot be by {list(by)}; allowed: " + " or ".join(str(list(a)) for a in allowed)
            )
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "by", by)

    @property
    def name(self) -> str:
        default = HEAD_AXES[0] if self.kind.per_head else STREAM_AXES[0]
        return self.kind.value if self.by == default else f"{self.kind.value}:{','.join(self.by)}"

    def site(self, layer: int) -> Site:
        return Site(self.kind, layer)

    def patches(self, n_layers: int, seq_len: int, n_heads: int) -> list[Patch]:
        positions = range(seq_len) if "position" in self.by else [None]
        heads = range(n_heads) if "head" in self.by else [None]
        return [Patch(layer, pos, head) for layer, pos, head in product(range(n_layers), positions, heads)]


def parse_sweeps(value) -> list[Sweep]:
    """Parse the ``sweep`` field of a patching spec into sweeps (see the module doc)."""
    if isinstance(value, Sweep):
        return [value]
    if isinstance(value, str):
        if value == "every_block":
            return [Sweep(k) for k in EVERY_BLOCK]
        if value == "every_head":
            return [Sweep(k) for k in EVERY_HEAD]
        return [Sweep(value)]
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"site", "by"})
        if unknown or "site" not in value:
            raise SweepError(f"a sweep mapping needs 'site' (and optionally 'by'); unknown keys: {unknown}")
        by = value.get("by")
        if by is not None and not (isinstance(by, list) and all(isinstance(a, str) for a in by)):
            raise SweepError(f"sweep 'by' must be a list like [layer, head], got {by!r}")
        return [Sweep(value["site"], by)]
    if isinstance(value, (list, tuple)) and value:
        out: list[Sweep] = []
        for item in value:
            for sweep in parse_sweeps(item):
                if sweep not in out:
                    out.append(sweep)
        return out
    raise SweepError(f"sweep must be a site name, a list, or {{site: ..., by: [...]}}, got {value!r}")
