"""A prompt and its target completion, tokenised, with the prompt cut into perturbation units.

A *unit* is what one perturbation removes: one token (``unit: token``) or one word, i.e. the tokens
the tokenizer's pre-tokenizer keeps together (``unit: word``; ``" E" + "iffel"`` is one word). Tokens
the tokenizer adds itself (a BOS token) are never perturbed and belong to no unit. The target's
tokens are appended to the prompt's (the prompt and the target are tokenised separately, so the
prompt's tokens are the same whatever the target) and are never perturbed either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from interplab.engine.tokens import TokenizationError, decode

Unit = Literal["token", "word"]


@dataclass(frozen=True)
class AttributionTask:
    """``prompt_ids`` (the prompt's tokens), ``target_ids`` (the completion's, at least one) and
    ``units``: the prompt positions of each unit, in order; ``unit_of[p]`` is position p's unit."""

    prompt: str
    target: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    units: tuple[tuple[int, ...], ...]
    pieces: tuple[str, ...]

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids)

    def unit_of(self) -> list[int | None]:
        out: list[int | None] = [None] * self.n_tokens
        for u, positions in enumerate(self.units):
            for p in positions:
                out[p] = u
        return out

    def positions(self, units: Sequence[int]) -> list[int]:
        """The prompt positions of ``units``, sorted."""
        return sorted(p for u in units for p in self.units[u])


def build_task(tokenizer, prompt: str, target: str, unit: Unit = "token") -> AttributionTask:
    """Tokenise ``prompt`` (the tokenizer's default way) and ``target`` (no special tokens) and cut
    the prompt into units. Raises :class:`TokenizationError` for an empty prompt or target."""
    enc = tokenizer(prompt, add_special_tokens=True, return_special_tokens_mask=True)
    ids = [int(i) for i in enc["input_ids"]]
    special = list(enc.get("special_tokens_mask") or [0] * len(ids))
    target_ids = [int(i) for i in tokenizer(target, add_special_tokens=False)["input_ids"]]
    if not target_ids:
        raise TokenizationError(f"target {target!r} tokenizes to no tokens; give a non-empty completion, e.g. ' Paris'")
    pieces = [decode(tokenizer, [i]) for i in ids]
    perturbable = [p for p in range(len(ids)) if not special[p]]
    if not perturbable:
        raise TokenizationError(f"prompt {prompt!r} has no tokens to perturb (only the tokenizer's own special tokens)")
    units: list[tuple[int, ...]]
    if unit == "token":
        units = [(p,) for p in perturbable]
    else:
        words = _word_ids(enc, pieces)
        groups: list[list[int]] = []
        last: int | None = None
        for p in perturbable:
            if groups and words[p] is not None and words[p] == last:
                groups[-1].append(p)
            else:
                groups.append([p])
            last = words[p]
        units = [tuple(g) for g in groups]
    return AttributionTask(prompt, target, tuple(ids), tuple(target_ids), tuple(units), tuple(pieces))


def _word_ids(enc, pieces: list[str]) -> list[int | None]:
    """The pre-tokenizer's word of each token (fast tokenizers), else a new word at each token that
    starts with whitespace."""
    try:
        words = enc.word_ids()
    except (ValueError, AttributeError):  # a slow (Python) tokenizer has no word ids
        words = None
    if words is not None:
        return list(words)
    out: list[int | None] = []
    word = -1
    for i, piece in enumerate(pieces):
        if i == 0 or piece[:1].isspace():
            word += 1
        out.append(word)
    return out
