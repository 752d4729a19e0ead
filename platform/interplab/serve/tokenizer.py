"""A client's copy of a served (fast) tokenizer, run by the ``tokenizers`` library.

The service sends its transformers tokenizer's backend as JSON (after transformers has set its
post-processor and added tokens) and its special tokens. Encoding text and decoding ids, what
every analysis does, run on that backend exactly as a transformers fast tokenizer runs them (no
truncation, no padding, special tokens in the text matched, no clean-up of spaces on decode), so a
client need not import transformers (~0.6 s on a 2-core CPU, and more at exit). Anything else (chat
templates, ``batch_decode``, ``convert_ids_to_tokens``, ...) is answered by a transformers
``PreTrainedTokenizerFast`` over the same JSON, built on first use.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any


class Encoding(dict):
    """What calling the tokenizer on one text returns: ``["input_ids"]`` (also ``.input_ids``)
    and ``["attention_mask"]``, as a transformers ``BatchEncoding`` of lists."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ServedTokenizer:
    """The served tokenizer (see the module docstring); ``full`` is the transformers tokenizer."""

    def __init__(self, tokenizer_json: str, special_tokens: dict[str, str], name_or_path: str = "") -> None:
        from tokenizers import Tokenizer

        self._json = tokenizer_json
        self.special_tokens_map = dict(special_tokens)
        self.name_or_path = name_or_path
        backend = Tokenizer.from_str(tokenizer_json)
        # as a transformers fast tokenizer encodes by default
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = False
        self.backend_tokenizer = backend

    @cached_property
    def full(self) -> Any:
        """The transformers tokenizer over the same JSON (imports transformers)."""
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(self._json), **self.special_tokens_map)
        tok.name_or_path = self.name_or_path
        return tok

    def __call__(self, text: Any = None, *args: Any, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        if args or kwargs or not isinstance(text, str):
            return self.full(text, *args, add_special_tokens=add_special_tokens, **kwargs)
        encoding = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return Encoding(input_ids=list(encoding.ids), attention_mask=list(encoding.attention_mask))

    def encode(self, text: Any, *args: Any, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        if args or kwargs or not isinstance(text, str):
            return self.full.encode(text, *args, add_special_tokens=add_special_tokens, **kwargs)
        return list(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> Any:
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids
        if kwargs or isinstance(ids, dict) or (isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], (list, tuple))):
            return self.full.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens_map.get(key)
        if token is None:
            return None
        found = self.backend_tokenizer.token_to_id(token)
        return found if found is not None or key == "unk_token" else self.unk_token_id

    pad_token_id = property(lambda self: self._special_id("pad_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))
    pad_token = property(lambda self: self.special_tokens_map.get("pad_token"))
    eos_token = property(lambda self: self.special_tokens_map.get("eos_token"))
    bos_token = property(lambda self: self.special_tokens_map.get("bos_token"))

    def __len__(self) -> int:
        return int(self.backend_tokenizer.get_vocab_size(with_added_tokens=True))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_json", "full", "backend_tokenizer", "special_tokens_map", "name_or_path"):
            raise AttributeError(name)
        return getattr(self.full, name)

    def __repr__(self) -> str:
        return f"ServedTokenizer(name_or_path={self.name_or_path!r}, vocab={len(self)})"
