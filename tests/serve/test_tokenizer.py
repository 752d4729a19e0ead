"""A client's served tokenizer (``ServedTokenizer``, the ``tokenizers`` library alone) encodes and
decodes exactly as the service's transformers tokenizer does, on a word-level tokenizer, a
byte-level BPE with added special tokens, and SmolLM2's; anything else goes to transformers."""

from __future__ import annotations

import pytest

from interplab.models.tiny import tiny_tokenizer
from interplab.serve.service import tokenizer_payload
from interplab.serve.tokenizer import ServedTokenizer

TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    " Mary",
    "  two leading spaces, and trailing ",
    "Ünïcødé — 東京 🙂 tabs\tand\nnewlines\r\n",
    "<|endoftext|>special in the text<|im_start|>",
    "",
    "a b c d unknownword the",
]


def byte_level_bpe():
    """A byte-level BPE trained on a few lines, with special tokens added (as GPT-2-like ones are)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([t * 20 for t in TEXTS[:4]], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )


def smollm2():
    from transformers import AutoTokenizer

    from interplab.models.loading import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))


@pytest.fixture(params=["word-level", "byte-level-bpe", pytest.param("smollm2", marks=pytest.mark.slow)])
def pair(request):
    hf = {"word-level": tiny_tokenizer, "byte-level-bpe": byte_level_bpe, "smollm2": smollm2}[request.param]()
    payload = tokenizer_payload(hf)
    assert payload is not None
    return hf, ServedTokenizer(payload["tokenizer_json"], payload["special_tokens"], payload["name_or_path"])


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encoding_equals_the_services_tokenizer(pair, add_special_tokens):
    hf, served = pair
    for text in TEXTS:
        want = hf(text, add_special_tokens=add_special_tokens)
        got = served(text, add_special_tokens=add_special_tokens)
        assert got["input_ids"] == want["input_ids"] == got.input_ids, text
        assert got["attention_mask"] == want["attention_mask"]
        assert served.encode(text, add_special_tokens=add_special_tokens) == hf.encode(
            text, add_special_tokens=add_special_tokens
        )


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decoding_equals_the_services_tokenizer(pair, skip_special_tokens):
    hf, served = pair
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert served.decode(ids, skip_special_tokens=skip_special_tokens) == hf.decode(
            ids, skip_special_tokens=skip_special_tokens
        )
        for i in ids:
            assert served.decode([i]) == hf.decode([i]) == served.decode(i)


def test_special_ids_and_size_equal_the_services_tokenizer(pair):
    hf, served = pair
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "pad_token", "eos_token", "bos_token"):
        assert getattr(served, name) == getattr(hf, name), name
    assert len(served) == len(hf)


def test_everything_else_goes_to_a_transformers_tokenizer_built_on_first_use(pair):
    hf, served = pair
    assert "full" not in served.__dict__
    ids = hf(TEXTS[0])["input_ids"]
    assert served.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert served.batch_decode([ids, ids[:2]]) == hf.batch_decode([ids, ids[:2]])
    assert "full" in served.__dict__
    padded = served(TEXTS[:2], padding=True)  # a batch with options: transformers' own call
    assert padded["input_ids"] == hf(TEXTS[:2], padding=True)["input_ids"]
    with pytest.raises(AttributeError):
        served.no_such_attribute  # noqa: B018
