"""Patching sweeps against plain one-forward-per-patch loops, and AtP against torch.autograd."""

import pytest
import torch

from interplab.analyses.metrics import MetricInputs, get_metric
from interplab.analyses.patching import Sweep, SweepError, activation_patching, parse_sweeps
from interplab.analyses.tasks import PairSet, facts_pairs, ioi_pairs
from interplab.engine import set_to
from interplab.engine.sites import Site

SWEEPS = [
    Sweep("resid_pre"),
    Sweep("resid_post"),
    Sweep("attn_out"),
    Sweep("mlp_out"),
    Sweep("z", ("layer", "head")),
    Sweep("head_out", ("layer", "position", "head")),
    Sweep("pattern", ("layer", "head")),
    Sweep("k", ("layer", "head")),
    Sweep("mlp_post", ("layer",)),
]


@pytest.fixture
def ioi(tiny):
    return PairSet.tokenize(tiny.tokenizer, ioi_pairs(tiny.tokenizer, 3, seed=1))


def naive_sweep(model, pairs: PairSet, sweep: Sweep, direction="denoise", metric="logit_diff", ablation=None):
    """One forward per (patch, prompt), written plainly: value -> {(layer, position, head): mean}."""
    fn = get_metric(metric)
    target_batch = pairs.corrupted if direction == "denoise" and ablation is None else pairs.clean
    source_batch = pairs.clean if target_batch is pairs.corrupted else pairs.corrupted
    clean_lp = model.run(pairs.clean, logits="last").logits.log_softmax(-1)
    out = {}
    seq = target_batch.seq_len
    for layer in range(model.n_layers):
        site = Site(sweep.kind, layer)
        positions = range(seq) if "position" in sweep.by else [None]
        heads = range(model.n_heads) if "head" in sweep.by else [None]
        for pos in positions:
            for head in heads:
                total = 0.0
                for i in range(pairs.size):
                    target = target_batch.select([i])
                    if ablation == "zero":
                        src = torch.zeros_like(model.run(target, capture=[site]).cache[site])
                    else:
                        src = model.run(source_batch.select([i]), capture=[site]).cache[site]
                    if sweep.kind.value == "pattern":
                        src = src.transpose(1, 2)
                    src = src[0]
                    kwargs = {}
                    if pos is not None:
                        kwargs["positions"] = [pos]
                        src = src[pos : pos + 1]
                    if head is not None:
                        kwargs["heads"] = [head]
                        src = src[:, head]
                    logits = model.run(target, interventions=[set_to(site, src, **kwargs)], logits="last").logits
                    inputs = MetricInputs(pairs.answer[[i]], pairs.wrong[[i]], clean_lp[[i]])
                    total += float(fn(logits, inputs))
                out[(layer, pos, head)] = total / pairs.size
    return out


def _check(result, sweep, reference, method="exact"):
    rows = [r for r in result.rows if r["sweep"] == sweep.name and r["method"] == method]
    assert len(rows) == len(reference)
    for r in rows:
        assert r["value"] == pytest.approx(reference[(r["layer"], r["position"], r["head"])], abs=1e-5), r


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda s: s.name)
def test_exact_sweeps_equal_naive_loop(tiny, ioi, sweep):
    result = activation_patching(tiny, ioi, [sweep], batch_rows=7)
    _check(result, sweep, naive_sweep(tiny, ioi, sweep))


def test_resid_mid_noising_and_kl(tiny_models):
    model = tiny_models("llama")
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 2, seed=3))
    sweep = Sweep("resid_mid")
    for direction, metric in (("noise", "logit_diff"), ("denoise", "kl"), ("denoise", "logprob"), ("noise", "prob")):
        result = activation_patching(model, pairs, [sweep], direction=direction, metric=metric, batch_rows=5)
        _check(result, sweep, naive_sweep(model, pairs, sweep, direction=direction, metric=metric))


def test_zero_ablation_sweep(tiny_models):
    model = tiny_models("gpt2")
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 2))
    sweep = Sweep("attn_out", ("layer",))
    result = activation_patching(model, pairs, [sweep], ablation="zero")
    _check(result, sweep, naive_sweep(model, pairs, sweep, ablation="zero"))


def test_resid_pre_sweep_matches_raw_transformers_hooks(family, hf_reference, tiny_models, ioi):
    """Independent of the engine: patch via a forward pre-hook on transformers' own decoder layer."""
    model = tiny_models(family)
    result = activation_patching(model, ioi, [Sweep("resid_pre")], batch_rows=64)
    decoder_layers = hf_reference.get_submodule(model.spec.base).get_submodule(model.spec.layers)
    with torch.no_grad():
        clean_hidden = hf_reference(input_ids=ioi.clean.input_ids, output_hidden_states=True).hidden_states
    for r in [r for r in result.rows if r["layer"] in (0, model.n_layers - 1)]:
        total = 0.0
        for i in range(ioi.size):
            value = clean_hidden[r["layer"]][i, r["position"]].detach()

            def hook(module, args, kwargs, value=value, pos=r["position"]):
                hidden = args[0].clone()
                hidden[:, pos] = value
                return (hidden, *args[1:]), kwargs

            handle = decoder_layers[r["layer"]].register_forward_pre_hook(hook, with_kwargs=True)
            try:
                with torch.no_grad():
                    logits = hf_reference(input_ids=ioi.corrupted.input_ids[[i]]).logits[0, -1]
            finally:
                handle.remove()
            total += float(logits[ioi.answer[i]] - logits[ioi.wrong[i]])
        assert r["value"] == pytest.approx(total / ioi.size, abs=1e-4)


def test_atp_equals_autograd_gradient_times_difference(tiny_models):
    model = tiny_models("llama")
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 3))
    result = activation_patching(model, pairs, [Sweep("resid_pre"), Sweep("z", ("layer", "head"))], method="both")
    # independent computation: plain autograd through transformers' forward with a retained input
    hf = model.model
    stack = model.base.get_submodule(model.spec.layers)
    saved = {}

    def keep(layer):
        def hook(module, args, kwargs):
            hidden = args[0]
            hidden.retain_grad()
            saved[layer] = hidden
        return hook

    clean = model.run(pairs.clean, capture=["resid_pre.0", "resid_pre.1", "resid_pre.2"]).cache
    handles = [stack[i].register_forward_pre_hook(keep(i), with_kwargs=True) for i in range(model.n_layers)]
    try:
        with torch.enable_grad():
            embeds = hf.get_input_embeddings()(pairs.corrupted.input_ids).detach().requires_grad_(True)
            logits = hf(inputs_embeds=embeds).logits[:, -1]
            metric = (logits.gather(1, pairs.answer[:, None]) - logits.gather(1, pairs.wrong[:, None])).sum()
            metric.backward()
    finally:
        for h in handles:
            h.remove()
    corrupted_metric = result.baselines["corrupted"]
    for r in [r for r in result.rows if r["method"] == "atp" and r["sweep"] == "resid_pre"]:
        layer, pos = r["layer"], r["position"]
        diff = clean[f"resid_pre.{layer}"][:, pos] - saved[layer].detach()[:, pos]
        expected = corrupted_metric + float((diff * saved[layer].grad[:, pos]).sum(-1).mean())
        assert r["value"] == pytest.approx(expected, abs=1e-4)
    assert -1.0 <= result.correlation["resid_pre"] <= 1.0 and "z" in result.correlation


def test_batching_does_not_change_results(tiny_models):
    model = tiny_models("qwen2")
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 4))
    sweeps = parse_sweeps("every_block")
    a = activation_patching(model, pairs, sweeps, batch_rows=3)
    b = activation_patching(model, pairs, sweeps, batch_rows=1000)
    assert [r["layer"] for r in a.rows] == [r["layer"] for r in b.rows]
    for x, y in zip(a.rows, b.rows):
        assert x["value"] == pytest.approx(y["value"], abs=1e-5)
        assert x["normalized"] == pytest.approx(y["normalized"], abs=1e-4)


def test_sweep_parsing_and_errors(tiny_models):
    assert [s.name for s in parse_sweeps("every_head")] == ["z", "q", "k", "v", "pattern"]
    assert parse_sweeps({"site": "head_out", "by": ["layer", "position", "head"]})[0].name == "head_out:layer,position,head"
    with pytest.raises(SweepError, match="unknown sweep site 'resid'.*resid_pre"):
        parse_sweeps("resid")
    with pytest.raises(SweepError, match=r"cannot be by \['head'\]"):
        parse_sweeps({"site": "z", "by": ["head"]})
    with pytest.raises(SweepError, match="no layers"):
        parse_sweeps("logits")
    model = tiny_models("llama")
    mixed = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 4, template="all"))
    with pytest.raises(SweepError, match="same number of tokens"):
        activation_patching(model, mixed, [Sweep("resid_pre")])
    activation_patching(model, mixed, [Sweep("z", ("layer", "head"))])  # fine without positions
    neox = tiny_models("gpt_neox")
    pairs = PairSet.tokenize(neox.tokenizer, ioi_pairs(neox.tokenizer, 2))
    with pytest.raises(ValueError, match="no resid_mid"):
        activation_patching(neox, pairs, [Sweep("resid_mid")])


def test_facts_and_ioi_generators_are_seeded_and_valid(tiny_models):
    tok = tiny_models("llama").tokenizer
    assert ioi_pairs(tok, 6, seed=2) == ioi_pairs(tok, 6, seed=2) != ioi_pairs(tok, 6, seed=3)
    for corruption in ("abc", "s2_random", "flip"):
        pairs = ioi_pairs(tok, 4, corruption=corruption)
        PairSet.tokenize(tok, pairs)
        for p in pairs:
            assert p.answer.strip() in p.clean and p.wrong.strip() in p.clean
    flip = ioi_pairs(tok, 1, corruption="flip", order="BABA")[0]
    assert flip.corrupted.endswith(f"{flip.answer.strip()} gave a {flip.clean.split(' gave a ')[1]}")
    facts = facts_pairs(tok, 3)
    PairSet.tokenize(tok, facts)


def test_patches_that_change_nothing_are_not_run(tiny_models):
    """A patch writing the value already there (positions before the first differing token, or a
    layer-0 position holding the same token) is the target run itself: no row is computed for it,
    and its value is still the naive loop's."""
    from interplab.analyses.tasks import PromptPair

    model = tiny_models("llama")
    pair = PromptPair(clean="When Mary and John went to the store, John gave a drink to",
                      corrupted="When Mary and John went to the store, Mary gave a drink to", answer=" Mary", wrong=" John")
    pairs = PairSet.tokenize(model.tokenizer, [pair])
    clean, corrupted = pairs.clean.input_ids[0], pairs.corrupted.input_ids[0]
    first = int((clean != corrupted).nonzero()[0])
    seq = pairs.clean.seq_len
    expected_rows = int((clean != corrupted).sum()) + (model.n_layers - 1) * (seq - first)

    ran = []
    real = model.run_stage

    def counting(batch, **kwargs):
        ran.append(batch.input_ids.shape[0])
        return real(batch, **kwargs)

    model.run_stage = counting
    try:
        result = activation_patching(model, pairs, [Sweep("resid_pre")], batch_rows=5)
    finally:
        del model.run_stage
    assert 0 < first < seq - 1 and sum(ran) == expected_rows < model.n_layers * seq
    assert (result.rows_run, result.rows_unchanged) == (expected_rows, model.n_layers * seq - expected_rows)
    _check(result, Sweep("resid_pre"), naive_sweep(model, pairs, Sweep("resid_pre")))
    skipped = [r for r in result.rows if r["position"] < first]
    assert skipped and all(r["value"] == pytest.approx(result.baselines["corrupted"], abs=1e-6) for r in skipped)


def test_metric_vocab_reads_only_answer_and_wrong_columns(monkeypatch):
    from interplab.analyses import metrics
    from interplab.analyses.metrics import metric_vocab, register_metric

    monkeypatch.setattr(metrics, "_METRICS", dict(metrics._METRICS))  # the test's metric stays local
    monkeypatch.setattr(metrics, "_TOKEN_ONLY", set(metrics._TOKEN_ONLY))

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    inputs = MetricInputs(torch.tensor([5, 9, 5, 40]), torch.tensor([9, 2, 7, 5]), logits.log_softmax(-1))
    vocab, sub = metric_vocab("logit_diff", inputs)
    assert vocab.tolist() == [2, 5, 7, 9, 40]
    fn = get_metric("logit_diff")
    torch.testing.assert_close(fn(logits[:, vocab], sub), fn(logits, inputs), rtol=0, atol=0)
    for name in ("prob", "logprob", "kl"):  # they normalise over the whole vocabulary
        assert metric_vocab(name, inputs) == (None, inputs)

    @register_metric("test_custom")
    def custom(logits, inputs):  # a registered metric reads every column unless it says otherwise
        return logits.sum(-1)

    assert metric_vocab("test_custom", inputs)[0] is None
