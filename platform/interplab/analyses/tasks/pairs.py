"""Prompt pairs and their validation against a tokenizer.

A :class:`PromptPair` is one clean prompt, its corrupted twin, the answer the clean prompt should
produce and the wrong answer (what the corrupted prompt suggests). :meth:`PairSet.tokenize` checks
what activation patching needs and names the offending prompt when something is off: clean and
corrupted prompts of equal token length, single-token answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interplab.engine.tokens import TokenBatch, TokenizationError, encode, show_tokens, single_token, tokenize


class TaskError(ValueError):
    """A task dataset that cannot be built or does not fit the model's tokenizer."""


@dataclass(frozen=True)
class PromptPair:
    clean: str
    corrupted: str
    answer: str
    wrong: str


@dataclass(frozen=True)
class PairSet:
    """Tokenised pairs: ``clean``/``corrupted`` batches, ``answer``/``wrong`` token ids ``Long[n]``."""

    pairs: tuple[PromptPair, ...]
    clean: TokenBatch
    corrupted: TokenBatch
    answer: torch.Tensor
    wrong: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.pairs)

    @property
    def same_length(self) -> bool:
        return bool((self.clean.lengths == self.clean.lengths[0]).all())

    @classmethod
    def tokenize(cls, tokenizer, pairs: Sequence[PromptPair]) -> PairSet:
        if not pairs:
            raise TaskError("no prompt pairs given")
        problems: list[str] = []
        answers: list[int] = []
        wrongs: list[int] = []
        for i, pair in enumerate(pairs):
            a, b = encode(tokenizer, pair.clean), encode(tokenizer, pair.corrupted)
            if len(a) != len(b):
                problems.append(
                    f"prompts[{i}]: clean {pair.clean!r} is {show_tokens(tokenizer, pair.clean)} but corrupted "
                    f"{pair.corrupted!r} is {show_tokens(tokenizer, pair.corrupted)}"
                )
            for field, text, out in (("answer", pair.answer, answers), ("wrong", pair.wrong, wrongs)):
                try:
                    out.append(single_token(tokenizer, text, what=f"prompts[{i}].{field}"))
                except TokenizationError as exc:
                    problems.append(str(exc))
        if problems:
            raise TaskError(
                "prompt pairs do not fit the tokenizer:\n  "
                + "\n  ".join(problems)
                + "\nfix: clean and corrupted prompts must have the same number of tokens, and answers must be one token"
            )
        return cls(
            tuple(pairs),
            tokenize(tokenizer, [p.clean for p in pairs]),
            tokenize(tokenizer, [p.corrupted for p in pairs]),
            torch.tensor(answers, dtype=torch.long),
            torch.tensor(wrongs, dtype=torch.long),
        )


_FIELDS = ("clean", "corrupted", "answer", "wrong")


def pairs_from_records(records: Sequence[dict], where: str = "prompts") -> list[PromptPair]:
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise TaskError(f"{where}[{i}] must be a mapping with keys {', '.join(_FIELDS)}, got {record!r}")
        missing = [k for k in _FIELDS if k not in record]
        extra = sorted(set(record) - set(_FIELDS))
        if missing or extra:
            raise TaskError(
                f"{where}[{i}]: missing keys {missing}, unknown keys {extra}; each pair needs exactly {', '.join(_FIELDS)}"
            )
        for key in _FIELDS:
            if not isinstance(record[key], str) or not record[key]:
                raise TaskError(f"{where}[{i}].{key} must be a non-empty string, got {record[key]!r}")
        out.append(PromptPair(*(record[k] for k in _FIELDS)))
    return out


def load_pairs(path: str | Path) -> list[PromptPair]:
    """Read pairs from a ``.yaml``/``.yml`` (a list, or ``{prompts: [...]}``) or ``.jsonl`` file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TaskError(f"prompt file not found: {path}")
    records: list[Any] | None
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise TaskError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    elif path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text())
        records = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise TaskError(f"{path}: expected a list of prompt pairs (or a mapping with 'prompts')")
    else:
        raise TaskError(f"{path}: unsupported prompt file type {path.suffix!r}; use .yaml, .yml or .jsonl")
    return pairs_from_records(records, where=str(path))
