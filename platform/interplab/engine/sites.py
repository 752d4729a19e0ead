"""Typed activation sites.

A site names one activation of a transformer: its kind (``resid_pre``, ``z``, ...), its layer and,
for per-head kinds, optionally one head. Sites are values (frozen, hashable); their canonical string
form ``kind[.layer[.head]]`` is used only at boundaries (CLI, YAML, the store) and parsed by
:meth:`Site.parse`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class SiteKind(str, Enum):
    """What a site is. ``docs/sites.md`` says exactly what each kind is for each family."""

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
    def layered(self) -> bool:
        """True for kinds that exist once per layer."""
        return self not in _GLOBAL_KINDS

    @property
    def per_head(self) -> bool:
        """True for kinds that have one activation per attention head."""
        return self in PER_HEAD_KINDS

    @property
    def in_attention(self) -> bool:
        """True for kinds computed inside the attention kernel (need the hooked attention path)."""
        return self in _ATTENTION_KINDS


_GLOBAL_KINDS = frozenset({SiteKind.EMBED, SiteKind.FINAL, SiteKind.LOGITS})
PER_HEAD_KINDS = frozenset(
    {SiteKind.HEAD_OUT, SiteKind.Z, SiteKind.Q, SiteKind.K, SiteKind.V, SiteKind.PATTERN,
     SiteKind.Q_IN, SiteKind.K_IN, SiteKind.V_IN}
)
SPLIT_INPUT_KINDS = (SiteKind.Q_IN, SiteKind.K_IN, SiteKind.V_IN)
_ATTENTION_KINDS = frozenset({SiteKind.Z, SiteKind.Q, SiteKind.K, SiteKind.V, SiteKind.PATTERN})
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
            raise SiteError(
                f"unknown site kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}"
            ) from None
        if kind.layered and layer is None:
            raise SiteError(f"site {kind.value!r} needs a layer, e.g. '{kind.value}.0'")
        if not kind.layered and layer is not None:
            raise SiteError(f"site {kind.value!r} has no layer; write it as '{kind.value}'")
        if head is not None and not kind.per_head:
            raise SiteError(
                f"site {kind.value!r} is not per head; only {sorted(k.value for k in PER_HEAD_KINDS)} take a head"
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
