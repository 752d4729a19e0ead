"""Tokenised batches: right-padded token ids with their lengths.

Prompts are tokenised exactly as the model's tokenizer does by default (``add_special_tokens=True``:
GPT-2 and SmolLM2 add no BOS token, Llama 3 and Gemma do). Positions in every result count these
tokens from 0. Batches are right-padded, so position ``i`` of a row is the same token whether the
row runs alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TokenizationError(ValueError):
    """Prompts that do not tokenise as an analysis requires (equal lengths, single tokens)."""


@dataclass(frozen=True)
class TokenBatch:
    """``input_ids``/``attention_mask`` are ``Long[b, s]`` (right-padded); ``lengths`` is ``Long[b]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    texts: tuple[str, ...] | None = None

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def padded(self) -> bool:
        return bool((self.lengths < self.seq_len).any())

    def last_positions(self) -> torch.Tensor:
        """Index of each row's last real token, ``Long[b]``."""
        return self.lengths - 1

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths.to(device), self.texts)

    def select(self, rows: Sequence[int] | torch.Tensor) -> TokenBatch:
        rows = torch.as_tensor(rows, dtype=torch.long)
        texts = tuple(self.texts[int(i)] for i in rows) if self.texts is not None else None
        return TokenBatch(self.input_ids[rows], self.attention_mask[rows], self.lengths[rows], texts)

    def repeat_rows(self, rows: torch.Tensor) -> TokenBatch:
        """A batch whose row ``i`` is this batch's row ``rows[i]`` (for sweeps)."""
        return self.select(rows)

    @classmethod
    def from_ids(cls, ids: Sequence[Sequence[int]], pad_id: int = 0, texts: Sequence[str] | None = None) -> TokenBatch:
        if not ids or any(len(row) == 0 for row in ids):
            raise TokenizationError("every prompt must have at least one token")
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, : len(row)] = 1
        lengths = mask.sum(dim=1)
        return cls(input_ids, mask, lengths, tuple(texts) if texts is not None else None)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The text of one sequence of token ids."""
    # transformers annotates decode as str | list[str] (a list for batched input); one id list is one str
    return cast(str, tokenizer.decode(ids))


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str]) -> TokenBatch:
    """Tokenise prompts the tokenizer's default way and right-pad them into a batch."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise TokenizationError("no prompts given")
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise TokenizationError(f"prompt {i} must be a string, got {type(text).__name__}")
    ids = [encode(tokenizer, text) for text in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise TokenizationError(f"prompt {i} ({prompts[i]!r}) tokenizes to no tokens")
    return TokenBatch.from_ids(ids, pad_id(tokenizer), prompts)


def show_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    ids = encode(tokenizer, text)
    pieces = [tokenizer.decode([i]) for i in ids]
    return f"{len(ids)} tokens {pieces!r}"


def check_equal_lengths(
    tokenizer: PreTrainedTokenizerBase,
    first: Sequence[str],
    second: Sequence[str],
    names: tuple[str, str] = ("clean", "corrupted"),
) -> None:
    """Raise one :class:`TokenizationError` naming every pair whose token counts differ."""
    if len(first) != len(second):
        raise TokenizationError(f"{len(first)} {names[0]} prompts but {len(second)} {names[1]} prompts")
    problems = []
    for i, (a, b) in enumerate(zip(first, second)):
        if len(encode(tokenizer, a)) != len(encode(tokenizer, b)):
            problems.append(
                f"prompt {i}: {names[0]} {a!r} is {show_tokens(tokenizer, a)}; {names[1]} {b!r} is {show_tokens(tokenizer, b)}"
            )
    if problems:
        raise TokenizationError(
            "prompts must tokenize to the same length (positions are compared one to one):\n  "
            + "\n  ".join(problems)
            + "\nfix: reword them so both have the same number of tokens (e.g. use single-token names)"
        )


def single_token(tokenizer: PreTrainedTokenizerBase, text: str, what: str = "answer") -> int:
    """The id of ``text`` if it is exactly one token (no special tokens), else a clear error."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise TokenizationError(
            f"{what} {text!r} must be a single token but is {len(ids)} tokens {pieces!r}; "
            "choose a word that is one token (often with a leading space, e.g. ' Mary')"
        )
    return int(ids[0])
