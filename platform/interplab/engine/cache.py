"""Captured activations and site gradients, keyed by :class:`Site`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from interplab.engine.sites import Site


class ActivationCache(Mapping[Site, torch.Tensor]):
    """Site -> tensor, with the positions each row's values come from.

    Each value has its kind's layout (:attr:`SiteKind.layout`): whole-stream sites ``[b, p, d]``,
    per-head sites ``[b, p, h, d]`` (``h == 1`` when the site selects a head), ``pattern``
    ``[b, h, p, s]``. ``positions``/``valid`` are ``[b, p]``.
    Look-ups accept a :class:`Site` or its string form: ``cache["resid_pre.3"]``.
    """

    def __init__(self, values: dict[Site, torch.Tensor], positions: torch.Tensor, valid: torch.Tensor):
        self._values = values
        self.positions = positions
        self.valid = valid

    def __getitem__(self, site: Site | str) -> torch.Tensor:
        key = Site.parse(site)
        if key not in self._values:
            have = ", ".join(str(s) for s in self._values) or "nothing"
            raise KeyError(f"site {key} was not captured; captured: {have}")
        return self._values[key]

    def __iter__(self) -> Iterator[Site]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{s}: {tuple(v.shape)}" for s, v in self._values.items())
        return f"ActivationCache({shapes})"

    def to(self, device: torch.device | str) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._values.items()}, self.positions, self.valid)
