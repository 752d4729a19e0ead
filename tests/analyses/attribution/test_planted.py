"""A planted task: a model whose target depends on exactly k known prompt tokens. ItP and HiPe find
those k and no others under every perturbation, and HiPe runs at most half as many rows as the
prompt has tokens when 10 % of them matter (counted at the backend)."""

import pytest

from interplab.analyses.attribution import attribute
from tests.analyses.attribution.planted import bos_tokenizer, planted_model, planted_prompt

MODES = ["baseline", "zero", "mean", "delete"]


class CountingBackend:
    """A backend that counts the rows of every forward pass that computes logits, then delegates."""

    def __init__(self, model):
        self.model = model
        self.rows = 0
        self.calls = 0

    def run(self, prompts, **kwargs):
        out = self.model.run(prompts, **kwargs)
        if kwargs.get("logits", "all") != "none":
            self.rows += out.batch.size
            self.calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.fixture(scope="module")
def planted():
    """Prompt -> (model, prompt, planted units), built once per prompt layout."""
    tok = bos_tokenizer()
    cache = {}

    def get(n, spans):
        key = (n, tuple(spans))
        if key not in cache:
            prompt, keys, units = planted_prompt(tok, n, spans)
            model, _ = planted_model(keys)
            cache[key] = (model, prompt, units, tok.get_vocab()["Ġthe"])
        return cache[key]

    return get


def found(result) -> set[int]:
    """Units whose attribution is over half the largest."""
    scores = result.scores.attribution
    top = max(scores)
    return {u for u, v in enumerate(scores) if v > 0.5 * top}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["itp", "hipe"])
@pytest.mark.parametrize("spans", [[(40, 50)], [(10, 15), (70, 75)], [(0, 3)]], ids=["one-span", "two-spans", "at-start"])
def test_both_methods_find_exactly_the_planted_tokens(planted, mode, method, spans):
    model, prompt, units, the = planted(100, spans)
    result = attribute(model, prompt, " Paris", method=method, perturbation=mode, baseline_id=the)
    assert found(result) == units
    scores = result.scores.attribution
    for u in units:
        assert result.scores.window[u] == 1  # measured alone: exact
        assert scores[u] == pytest.approx(1.0, abs=0.05)  # one key token is worth ~1 nat by construction
    assert max(abs(v) for u, v in enumerate(scores) if u not in units) < 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_hipe_runs_at_most_half_the_rows_when_a_tenth_matters(planted, mode):
    model, prompt, units, the = planted(100, [(40, 50)])
    counted = CountingBackend(model)
    result = attribute(counted, prompt, " Paris", method="hipe", perturbation=mode, baseline_id=the)
    assert len(units) == 10 and result.task.n_units == 100
    assert counted.rows <= 50  # the unperturbed row included
    assert (result.cost.forwards, result.cost.passes) == (counted.rows, counted.calls)
    itp_counted = CountingBackend(model)
    attribute(itp_counted, prompt, " Paris", method="itp", perturbation=mode, baseline_id=the)
    assert itp_counted.rows == 101 and itp_counted.calls == 1  # one round, one batched pass


def test_rounds_split_into_passes_of_max_rows(planted):
    model, prompt, units, the = planted(100, [(40, 50)])
    counted = CountingBackend(model)
    result = attribute(counted, prompt, " Paris", method="itp", perturbation="zero", max_rows=16)
    assert counted.calls == 7 and counted.rows == 101  # ceil(101 / 16) passes
    assert (result.cost.passes, result.cost.rounds) == (7, 1)
    assert found(result) == units
