"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

Prompts follow the paper's templates ("Then, [B] and [A] went to the [PLACE]. [B] gave a
[OBJECT] to"): the indirect object IO = A is the answer, the subject S = B the wrong answer. Order
``BABA`` keeps the template, ``ABBA`` swaps the first two names, ``mixed`` alternates. Names, places
and objects are kept only if they are one token (with a leading space) for the model's tokenizer,
so every prompt of a template has the same length.

Corruptions: ``abc`` (all three name slots replaced by three other distinct names), ``s2_random``
(the second subject mention S2 replaced by a random other name), ``flip`` (S2 replaced by the IO).
"""

from __future__ import annotations

import random
from importlib import resources
from typing import Literal

from interplab.analyses.tasks.pairs import PromptPair, TaskError

IOI_CORRUPTIONS = ("abc", "s2_random", "flip")
Order = Literal["BABA", "ABBA", "mixed"]


def _words(name: str) -> list[str]:
    text = resources.files("interplab.data").joinpath("tasks").joinpath(name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def templates() -> list[str]:
    return _words("ioi_templates.txt")


def _single_token(tokenizer, words: list[str]) -> list[str]:
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def _fill(template: str, s1: str, io: str, s2: str, place: str, obj: str, order: str) -> str:
    first, second = (s1, io) if order == "BABA" else (io, s1)
    text = template.replace("[B] and [A]", f"{first} and {second}", 1)
    text = text.replace("[B]", s2, 1)
    return text.replace("[PLACE]", place).replace("[OBJECT]", obj)


def ioi_pairs(
    tokenizer,
    n: int,
    *,
    seed: int = 0,
    corruption: str = "abc",
    order: Order = "mixed",
    template: int | Literal["all"] = 0,
) -> list[PromptPair]:
    """``n`` seeded IOI pairs (template 0 by default, so all prompts share one length)."""
    if corruption not in IOI_CORRUPTIONS:
        raise TaskError(f"unknown IOI corruption {corruption!r}; use one of {', '.join(IOI_CORRUPTIONS)}")
    if order not in ("BABA", "ABBA", "mixed"):
        raise TaskError(f"unknown IOI order {order!r}; use BABA, ABBA or mixed")
    if not isinstance(n, int) or n < 1:
        raise TaskError(f"IOI needs n >= 1 prompts, got {n!r}")
    all_templates = templates()
    if template == "all":
        chosen = all_templates
    elif isinstance(template, int) and 0 <= template < len(all_templates):
        chosen = [all_templates[template]]
    else:
        raise TaskError(f"IOI template {template!r} out of range; use 0..{len(all_templates) - 1} or 'all'")
    names = _single_token(tokenizer, _words("ioi_names.txt"))
    places = _single_token(tokenizer, _words("ioi_places.txt"))
    objects = _single_token(tokenizer, _words("ioi_objects.txt"))
    if len(names) < 5 or not places or not objects:
        raise TaskError(
            f"the tokenizer has too few single-token IOI words (names {len(names)}, places {len(places)}, "
            f"objects {len(objects)}); IOI needs at least 5 names and one place and object"
        )
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        text = chosen[i % len(chosen)]
        io, s = rng.sample(names, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        row_order = order if order != "mixed" else ("BABA" if i % 2 == 0 else "ABBA")
        clean = _fill(text, s, io, s, place, obj, row_order)
        others = [x for x in names if x not in (io, s)]
        if corruption == "abc":
            x, y, z = rng.sample(others, 3)
            corrupted = _fill(text, x, y, z, place, obj, row_order)
        elif corruption == "s2_random":
            corrupted = _fill(text, s, io, rng.choice(others), place, obj, row_order)
        else:  # flip: the second mention is the IO, so the "answer" flips to S
            corrupted = _fill(text, s, io, io, place, obj, row_order)
        pairs.append(PromptPair(clean, corrupted, " " + io, " " + s))
    return pairs
