"""Typed activation sites.

A site names one activation of a transformer: its kind (``resid_pre``, ``z``, ...), its layer and,
for per-head kinds, optionally one head. Sites are values (frozen, hashable); their canonical string
form ``kind[.layer[.head]]`` is used only at boundaries (CLI, YAML, the store) and parsed by
:meth:`Site.parse`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class SiteKind(str, Enum):
    """What a site is. ``docs/sites.md`` says exactly what each kind is for each family.

    What the engine and the analyses need to know about a kind is on the kind itself (see
    :class:`KindFacts`): ``kind.layered``, ``kind.per_head``, ``kind.in_attention``,
    ``kind.split_input``, ``kind.layout`` and the properties derived from them.
    """

    EMBED = "embed"
    RESID_PRE = "resid_pre"
    RESID_MID = "resid_mid"
    RESID_POST = "resid_post"
    ATTN_OUT = "attn_out"
    MLP_OUT = "mlp_out"
    HEAD_OUT = "head_out"
    Z = "z"
    Q = "q"
    K = "k"
    V = "v"
    PATTERN = "pattern"
    MLP_POST = "mlp_post"
    Q_IN = "q_in"
    K_IN = "k_in"
    V_IN = "v_in"
    MLP_IN = "mlp_in"
    FINAL = "final"
    LOGITS = "logits"

    @property
    def layout(self) -> tuple[str, ...]:
        """Axes of a captured activation (and of its gradient), e.g. ``("b", "p", "h", "d_head")``;
        ``pattern`` is ``("b", "h", "p", "s")``. See :class:`KindFacts` for the axis names."""
        return _FACTS[self].layout

    @property
    def layered(self) -> bool:
        """True for kinds that exist once per layer (not ``embed``, ``final``, ``logits``)."""
        return _FACTS[self].layered

    @property
    def per_head(self) -> bool:
        """True for kinds that have one activation per attention head (a site may select one head)."""
        return "h" in _FACTS[self].layout

    @property
    def head_axis(self) -> int | None:
        """The head axis of the captured layout (2, or 1 for ``pattern``); None if not per head."""
        layout = _FACTS[self].layout
        return layout.index("h") if "h" in layout else None

    @property
    def position_axis(self) -> int:
        """The (query) position axis of the captured layout (1, or 2 for ``pattern``)."""
        return _FACTS[self].layout.index("p")

    @property
    def heads_first(self) -> bool:
        """True when the captured layout puts heads before positions (``pattern``, ``[b, h, p, s]``),
        unlike the canonical layout ``[b, p, ...]`` interventions address (:meth:`to_canonical`)."""
        return self.head_axis is not None and self.head_axis < self.position_axis

    @property
    def in_attention(self) -> bool:
        """True for kinds computed inside the attention kernel (``q``, ``k``, ``v``, ``pattern``,
        ``z``): touching one of them moves its layer off the fused attention path."""
        return _FACTS[self].in_attention

    @property
    def split_input(self) -> bool:
        """True for the per-head projection inputs ``q_in``, ``k_in``, ``v_in`` (the engine gives every
        query head its own copy of the stream; absent from post-norm families)."""
        return _FACTS[self].qkv is not None

    @property
    def qkv(self) -> str | None:
        """``"q"``, ``"k"`` or ``"v"``: which projection a split-input kind feeds (None for others)."""
        return _FACTS[self].qkv

    @property
    def key_indexed(self) -> bool:
        """True for kinds with an axis over key positions (``k``, ``v``: their positions; ``pattern``:
        its last axis). With a cached KV prefix that axis also covers the prefix's positions."""
        return _FACTS[self].key_indexed

    @property
    def fixed_width(self) -> bool:
        """False for ``pattern``, whose last axis is the sequence length: its rows have no fixed width."""
        return "s" not in _FACTS[self].layout

    def to_canonical(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor in this kind's captured layout, in the canonical layout ``[b, p, ...]`` (a view):
        ``pattern`` ``[b, h, q, k]`` -> ``[b, q, h, k]``; every other kind is already canonical."""
        return self._swap_heads_and_positions(x)

    def from_canonical(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_canonical`."""
        return self._swap_heads_and_positions(x)

    def _swap_heads_and_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Swap the head and position axes when heads come first (:attr:`heads_first`); else ``x``."""
        head_axis = self.head_axis
        if head_axis is None or head_axis >= self.position_axis:
            return x
        return x.transpose(head_axis, self.position_axis)


@dataclass(frozen=True)
class KindFacts:
    """What the engine and the analyses rely on about one site kind (``docs/sites.md``, "Layouts").

    Attributes:
        layout: the captured tensor's axes: ``b`` rows, ``p`` captured (query) positions, ``h``
            (query) heads, ``s`` every key position, and the widths ``d_model``, ``d_head``,
            ``d_mlp``, ``vocab``.
        layered: the kind exists once per layer.
        in_attention: computed inside the attention kernel.
        qkv: for ``q_in``/``k_in``/``v_in``, the projection whose input the kind is.
        key_indexed: an axis runs over key positions.
    """

    layout: tuple[str, ...]
    layered: bool = True
    in_attention: bool = False
    qkv: str | None = None
    key_indexed: bool = False


_STREAM = ("b", "p", "d_model")
_HEADS = ("b", "p", "h", "d_head")
_HEAD_STREAM = ("b", "p", "h", "d_model")
_FACTS: dict[SiteKind, KindFacts] = {
    SiteKind.EMBED: KindFacts(_STREAM, layered=False),
    SiteKind.RESID_PRE: KindFacts(_STREAM),
    SiteKind.RESID_MID: KindFacts(_STREAM),
    SiteKind.RESID_POST: KindFacts(_STREAM),
    SiteKind.ATTN_OUT: KindFacts(_STREAM),
    SiteKind.MLP_OUT: KindFacts(_STREAM),
    SiteKind.HEAD_OUT: KindFacts(_HEAD_STREAM),
    SiteKind.Z: KindFacts(_HEADS, in_attention=True),
    SiteKind.Q: KindFacts(_HEADS, in_attention=True),
    SiteKind.K: KindFacts(_HEADS, in_attention=True, key_indexed=True),
    SiteKind.V: KindFacts(_HEADS, in_attention=True, key_indexed=True),
    SiteKind.PATTERN: KindFacts(("b", "h", "p", "s"), in_attention=True, key_indexed=True),
    SiteKind.MLP_POST: KindFacts(("b", "p", "d_mlp")),
    SiteKind.Q_IN: KindFacts(_HEAD_STREAM, qkv="q"),
    SiteKind.K_IN: KindFacts(_HEAD_STREAM, qkv="k"),
    SiteKind.V_IN: KindFacts(_HEAD_STREAM, qkv="v"),
    SiteKind.MLP_IN: KindFacts(_STREAM),
    SiteKind.FINAL: KindFacts(_STREAM, layered=False),
    SiteKind.LOGITS: KindFacts(("b", "p", "vocab"), layered=False),
}

# Derived names kept for modules that import them (prefer the properties on SiteKind).
PER_HEAD_KINDS = frozenset(k for k in SiteKind if k.per_head)
SPLIT_INPUT_KINDS = tuple(k for k in SiteKind if k.split_input)  # q, k, v order
RESIDUAL_KINDS = (SiteKind.RESID_PRE, SiteKind.RESID_MID, SiteKind.RESID_POST)
VALID_KINDS = tuple(k.value for k in SiteKind)


class SiteError(ValueError):
    """A site that does not exist (unknown kind, layer or head out of range, not in this family)."""


@dataclass(frozen=True, order=True)
class Site:
    """One activation site: ``Site("resid_pre", 3)``, ``Site("z", 5, head=2)``, ``Site("logits")``.

    ``head`` is only meaningful for per-head kinds; ``None`` there means all heads of the layer.
    """

    kind: SiteKind
    layer: int | None = None
    head: int | None = None

    def __init__(self, kind: SiteKind | str, layer: int | None = None, head: int | None = None):
        try:
            kind = SiteKind(kind)
        except ValueError:
            raise SiteError(f"unknown site kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}") from None
        if kind.layered and layer is None:
            raise SiteError(f"site {kind.value!r} needs a layer, e.g. '{kind.value}.0'")
        if not kind.layered and layer is not None:
            raise SiteError(f"site {kind.value!r} has no layer; write it as '{kind.value}'")
        if head is not None and not kind.per_head:
            raise SiteError(
                f"site {kind.value!r} is not per head; only {sorted(k.value for k in SiteKind if k.per_head)} take a head"
            )
        for name, value in (("layer", layer), ("head", head)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise SiteError(f"site {kind.value!r}: {name} must be a non-negative integer, got {value!r}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "head", head)

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """Parse the canonical form ``kind[.layer[.head]]`` (``resid_pre.3``, ``z.5.2``, ``logits``)."""
        if isinstance(text, Site):
            return text
        if not isinstance(text, str) or not text:
            raise SiteError(f"a site must be a string like 'resid_pre.3', got {text!r}")
        parts = text.strip().split(".")
        if len(parts) > 3:
            raise SiteError(f"cannot parse site {text!r}: expected 'kind[.layer[.head]]', e.g. 'z.5.2'")
        numbers: list[int] = []
        for part in parts[1:]:
            if not part.isdigit():
                raise SiteError(
                    f"cannot parse site {text!r}: {part!r} is not a layer/head number; "
                    "expected 'kind[.layer[.head]]', e.g. 'resid_pre.3' or 'z.5.2'"
                )
            numbers.append(int(part))
        return cls(parts[0], *numbers)

    def __str__(self) -> str:
        out = self.kind.value
        if self.layer is not None:
            out += f".{self.layer}"
        if self.head is not None:
            out += f".{self.head}"
        return out

    def __repr__(self) -> str:
        return f"Site({str(self)!r})"

    def all_heads(self) -> Site:
        """The same site without a head selection."""
        return Site(self.kind, self.layer) if self.head is not None else self


def parse_sites(items: str | Site | list[str | Site] | tuple[str | Site, ...]) -> list[Site]:
    """Parse one site or a list of sites, keeping order and dropping duplicates."""
    if isinstance(items, (str, Site)):
        items = [items]
    out: list[Site] = []
    for item in items:
        site = Site.parse(item)
        if site not in out:
            out.append(site)
    return out
