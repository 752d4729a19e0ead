"""Factual recall pairs: "The Eiffel Tower is located in the city of" -> " Paris", corrupted by
another subject of the same relation ("The Colosseum ...", whose attribute is the wrong answer).

Only pairs whose prompts have equal token length and whose attributes are single tokens (with a
leading space) for the model's tokenizer are kept; the subject pairing is seeded.
"""

from __future__ import annotations

import random
from collections import defaultdict
from importlib import resources

from interplab.analyses.tasks.pairs import PromptPair, TaskError


def _facts() -> list[tuple[str, str, str]]:
    text = resources.files("interplab.data").joinpath("tasks").joinpath("facts.tsv").read_text()
    rows = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            subject, template, attribute = line.split("\t")
            rows.append((subject, template, attribute))
    return rows


def facts_pairs(tokenizer, n: int, *, seed: int = 0) -> list[PromptPair]:
    """Up to ``n`` seeded factual-recall pairs that fit the tokenizer (error if none do)."""
    if not isinstance(n, int) or n < 1:
        raise TaskError(f"facts needs n >= 1 prompts, got {n!r}")

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])

    def one_token(text: str) -> bool:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1

    by_template: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for subject, template, attribute in _facts():
        if one_token(" " + attribute):
            by_template[template].append((subject, attribute))
    candidates = []
    for template, facts in by_template.items():
        for subject, attribute in facts:
            for other, other_attribute in facts:
                prompt, corrupted = template.format(subject), template.format(other)
                if other_attribute != attribute and length(prompt) == length(corrupted):
                    candidates.append(PromptPair(prompt, corrupted, " " + attribute, " " + other_attribute))
    if not candidates:
        raise TaskError("no factual-recall pair fits this tokenizer (equal lengths, single-token attributes)")
    rng = random.Random(seed)
    rng.shuffle(candidates)
    return candidates[:n]
