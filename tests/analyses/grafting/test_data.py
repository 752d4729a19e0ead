"""Shipped facts, seeded one-to-one assignments, user files and their errors."""

from __future__ import annotations

import json

import pytest

from interplab import load_model
from interplab.analyses.grafting import data as D
from interplab.analyses.grafting.evaluate import ranks_from_logits


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-llama").tokenizer


def test_shipped_lists():
    train, test = D.names("train"), D.names("test")
    assert len(train) >= 20 and len(test) >= 20 and not set(train) & set(test)
    cities = D.cities()
    assert len({c for c, _, _ in cities}) == len(cities) >= 20
    assert set(D.landmarks()) <= {c for c, _, _ in cities}
    assert set(D.templates()) == {"first_hop", "second_hop"}


@pytest.mark.parametrize("seed", [0, 3])
def test_first_hop_assignments(seed):
    class Chars:  # a tokenizer whose first token is the first word: every city and language is distinct
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [hash(w) % 100003 for w in text.split()] or [0]}

    data = D.first_hop(Chars(), 12, seed=seed)
    city_of = {ex.prompt: ex.answer for ex in data["F"]}
    prime = {ex.prompt: ex.answer for ex in data["F_prime"]}
    assert len(set(city_of.values())) == 12  # one-to-one
    assert set(city_of) == set(prime) and all(city_of[p] != prime[p] for p in city_of)  # a derangement
    assert sorted(prime.values()) == sorted(city_of.values())
    lang = {c: l for c, _, l in D.cities()}
    for fact, impl in zip(data["F_prime"], data["ImplF_prime"]):
        name = fact.prompt.removesuffix(" lives in")
        assert name in impl.prompt and impl.answer == " " + lang[fact.answer.strip()]
        assert impl.answer in impl.options and len(impl.options) == 12
    new_names = {ex.prompt.removesuffix(" lives in") for ex in data["F_new"]}
    assert new_names <= set(D.names("test"))
    assert D.first_hop(Chars(), 12, seed=seed) == data and D.first_hop(Chars(), 12, seed=seed + 1) != data


def test_second_hop_on_a_real_tokenizer_has_distinct_first_tokens():
    model = load_model("tiny-gpt2")  # word-level tokenizer: full names are unknown words, cities known
    with pytest.raises(D.GraftingDataError, match="distinct first tokens"):
        D.second_hop(model.tokenizer, 5)


def test_user_files(tmp_path, tokenizer):
    jsonl = tmp_path / "facts.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"set": "F", "prompt": "Mary lives in", "answer": " Paris"},
        {"set": "F", "prompt": "John lives in", "answer": " Rome"},
        {"set": "ImplF", "prompt": "The people in the city Mary is from speak", "answer": " French", "options": [" French", " Italian"]},
    ]))
    data = D.load_task_file(jsonl)
    assert data["F"][0].options == (" Paris", " Rome")
    D.check_examples(tokenizer, data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("F:\n- {prompt: Mary lives in, answer: ' Paris', options: [' Rome']}\n")
    with pytest.raises(D.GraftingDataError, match="not among options"):
        D.check_examples(tokenizer, D.load_task_file(bad))
    bad.write_text("G: [{prompt: a, answer: b}]\n")
    with pytest.raises(D.GraftingDataError, match="unknown set 'G'"):
        D.load_task_file(bad)


def test_rank_is_count_of_options_above_the_answer():
    import torch

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 1.0, 0.0]])
    ranks, lps = ranks_from_logits(logits, torch.tensor([2, 1]), [torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2, 3])])
    assert ranks == [2, 1]  # ties (1.0 vs 1.0) favour the answer
    assert lps[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[2]))
