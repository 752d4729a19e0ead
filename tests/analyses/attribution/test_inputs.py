"""Units: tokens or words; tokens the tokenizer adds (BOS) are never perturbed; targets are required."""

import pytest

from interplab.analyses.attribution import build_task
from interplab.engine.tokens import TokenizationError
from tests.analyses.attribution.planted import bos_tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from interplab.models.loading import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))


def test_word_units_group_the_pre_tokenizers_words(smollm2_tokenizer):
    task = build_task(smollm2_tokenizer, "The Eiffel Tower is in", " Paris", unit="word")
    assert task.pieces == ("The", " E", "iffel", " Tower", " is", " in")
    assert task.units == ((0,), (1, 2), (3,), (4,), (5,))
    tokens = build_task(smollm2_tokenizer, "The Eiffel Tower is in", " Paris", unit="token")
    assert tokens.units == tuple((p,) for p in range(6))
    assert tokens.target_ids == tuple(smollm2_tokenizer(" Paris", add_special_tokens=False)["input_ids"])


def test_tokens_the_tokenizer_adds_belong_to_no_unit():
    task = build_task(bos_tokenizer(), "the cat sat", " Paris")
    assert task.prompt_ids[0] == 1 and task.n_tokens == 4
    assert task.units == ((1,), (2,), (3,))
    assert task.unit_of() == [None, 0, 1, 2]


def test_an_empty_target_is_refused(smollm2_tokenizer):
    with pytest.raises(TokenizationError, match="target ''"):
        build_task(smollm2_tokenizer, "The Eiffel Tower is in", "")
