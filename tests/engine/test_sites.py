import pytest
import torch

from interplab.engine.interventions import Intervention
from interplab.engine.sites import Site, SiteError, SiteKind, parse_sites
from tests.conftest import SHORT


def test_round_trip_of_canonical_form():
    for text in ["embed", "resid_pre.0", "resid_mid.3", "z.5", "z.5.2", "pattern.1.0", "logits", "final"]:
        assert str(Site.parse(text)) == text
    assert Site.parse("z.5.2") == Site(SiteKind.Z, 5, head=2)
    assert Site.parse("z.5.2").all_heads() == Site("z", 5)


@pytest.mark.parametrize(
    "text, message",
    [
        ("resid_pr.3", "valid kinds: embed, resid_pre"),
        ("resid_pre", "needs a layer"),
        ("logits.2", "has no layer"),
        ("resid_pre.1.2", "not per head"),
        ("z.one", "not a layer/head number"),
        ("z.1.2.3", r"expected 'kind\[\.layer\[\.head\]\]'"),
    ],
)
def test_bad_sites_say_what_is_allowed(text, message):
    with pytest.raises(SiteError, match=message):
        Site.parse(text)


def test_parse_sites_keeps_order_and_drops_duplicates():
    assert parse_sites(["z.1", "resid_pre.0", "z.1"]) == [Site("z", 1), Site("resid_pre", 0)]


def test_model_checks_ranges_and_family(tiny_models):
    llama = tiny_models("llama")
    with pytest.raises(SiteError, match=r"layer 7 out of range.*layers 0..2"):
        llama.validate_site("resid_pre.7")
    with pytest.raises(SiteError, match=r"head 9 out of range.*heads 0..3"):
        llama.validate_site("z.0.9")
    neox = tiny_models("gpt_neox")
    with pytest.raises(SiteError, match="no resid_mid"):
        neox.validate_site("resid_mid.0")
    assert Site("resid_mid", 0) not in neox.sites()
    assert len(llama.sites(["resid_pre"])) == llama.n_layers


# ---------------------------------------------------------------- per-kind facts against the engine

def _axis_sizes(model, batch, n_positions: int, seq_len: int | None = None) -> dict[str, int]:
    return {"b": batch.size, "p": n_positions, "h": model.n_heads, "s": seq_len or batch.seq_len,
            "d_model": model.d_model, "d_head": model.head_dim, "d_mlp": model.d_mlp, "vocab": model.d_vocab}


def test_kind_layouts_are_what_the_engine_captures_and_differentiates(tiny):
    """Every site of one layer (and the global ones), captured and differentiated at two positions of
    a padded batch, has exactly its kind's layout; a site with a head narrows the kind's head axis."""
    batch = tiny.tokenize(SHORT)
    sites = [s for s in tiny.sites() if s.layer in (None, 1)]
    heads = [Site(s.kind, 1, head=2) for s in sites if s.kind.per_head]
    out = tiny.run(batch, capture=sites + heads, positions=[0, -1])
    metric = lambda logits, b: logits[:, -1, :3].sum()  # noqa: E731
    grads = tiny.gradients(batch, metric, sites, positions=[0, -1]).grads
    size = _axis_sizes(tiny, batch, 2)
    for site in sites:
        layout = site.kind.layout
        assert tuple(out.cache[site].shape) == tuple(size[a] for a in layout), (site, layout)
        assert grads[site].shape == out.cache[site].shape, site
    for site in heads:
        kind = site.kind
        assert out.cache[site].shape[kind.head_axis] == 1
        torch.testing.assert_close(out.cache[site], out.cache[site.all_heads()].narrow(kind.head_axis, 2, 1))


def test_pattern_is_captured_heads_first_and_changed_in_the_canonical_layout(tiny_models):
    """``pattern`` is captured ``[b, h, q, k]`` (causal rows summing to one); interventions address it
    as ``[b, q, h, k]``, which :meth:`SiteKind.to_canonical` gives."""
    model = tiny_models("llama")
    kind = SiteKind.PATTERN
    assert kind.heads_first and kind.layout == ("b", "h", "p", "s") and not kind.fixed_width
    result = model.run(SHORT, capture=["pattern.0"])
    base = result.cache["pattern.0"]
    canonical = kind.to_canonical(base)  # [b, q, h, k]
    s = canonical.shape[1]
    assert torch.equal(kind.from_canonical(canonical), base)
    assert bool((canonical.masked_select(~torch.ones(s, s, dtype=torch.bool).tril()[None, :, None, :]) == 0).all())
    real = result.batch.attention_mask.bool()  # [b, q]
    torch.testing.assert_close(canonical.sum(-1)[real], torch.ones(int(real.sum()), model.n_heads))
    one_hot = torch.zeros(s)
    one_hot[0] = 1.0
    item = Intervention("pattern.0", "set", value=one_hot, positions=[3], heads=[1])
    out = model.run(SHORT, capture=["pattern.0"], interventions=[item]).cache["pattern.0"]
    assert torch.equal(out[:, 1, 3], one_hot.expand(2, -1))  # captured: head 1, query 3
    changed = (out - base).abs().amax(-1) > 0  # [b, h, q]
    assert changed[:, 1, 3].all() and int(changed.sum()) == 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_in_attention_kinds_are_the_ones_the_attention_kernel_computes(tiny_models, family, monkeypatch):
    """Which function hands each kind to the plan: the ``in_attention`` kinds, and only they, come
    from the attention kernel."""
    import sys

    from interplab.engine.plan import HookPlan

    model = tiny_models(family)
    process = HookPlan.process
    caller: dict[SiteKind, set[str]] = {}

    def recording(self, kind, layer, x):
        caller.setdefault(kind, set()).add(sys._getframe(1).f_code.co_name)
        return process(self, kind, layer, x)

    monkeypatch.setattr(HookPlan, "process", recording)
    model.run(SHORT, interventions=[Intervention(s, "scale", value=1.0) for s in model.sites() if s.layer in (None, 0)])
    assert caller.keys() == {s.kind for s in model.sites()}
    for kind, where in caller.items():
        assert (where == {"interplab_attention"}) == kind.in_attention, (kind, where)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_in_attention_kinds_are_the_ones_that_leave_the_fused_kernel(tiny_models, family, monkeypatch):
    """Touching an ``in_attention`` kind at layer 0 makes that layer compute attention explicitly; any
    other kind leaves every layer on PyTorch's fused kernel."""
    model = tiny_models(family)
    fused = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    for site in model.sites():
        if site.layer not in (None, 0):
            continue
        calls.clear()
        out = model.run(SHORT[:1], capture=[site])
        assert site in out.cache  # captured: the kernel did not skip it
        assert len(calls) == model.n_layers - (1 if site.kind.in_attention else 0), site


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_split_input_kinds_feed_only_their_own_projection(tiny_models, family):
    """A change to one head's ``q_in``/``k_in``/``v_in`` reaches that head's ``kind.qkv`` projection
    (the ``q``/``k``/``v`` site) and nothing else of the layer's q, k and v."""
    model = tiny_models(family)
    vec = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    projected = [Site(k, 0) for k in (SiteKind.Q, SiteKind.K, SiteKind.V)]
    base = model.run(SHORT, capture=projected).cache
    split = [k for k in SiteKind if k.split_input]
    assert [k.qkv for k in split] == ["q", "k", "v"]
    for kind in split:
        out = model.run(SHORT, capture=projected, interventions=[Intervention(Site(kind, 0, head=1), "add", value=vec)]).cache
        for site in projected:
            changed = (out[site] - base[site]).abs().amax(dim=(0, 1, 3)) > 1e-4  # per head
            want = [h == 1 and site.kind == SiteKind(kind.qkv) for h in range(model.n_heads)]
            assert changed.tolist() == want, (kind, site)
    post_norm = tiny_models("gemma2")
    assert not any(s.kind.split_input for s in post_norm.sites())


def test_key_indexed_axes_cover_a_cached_prefix(tiny_models):
    """With a cached KV prefix of p positions a pass computes positions p.. only; the axes of
    ``key_indexed`` kinds over key positions still cover every position (the prefix's too)."""
    from interplab.engine.plan import KVPrefix

    model = tiny_models("llama")
    batch = model.tokenize(SHORT[0])
    full = model.run(batch, capture=["resid_pre.1"], keep_kv=True)
    p, s = 2, batch.seq_len
    prefix = KVPrefix(p, {layer: (k[:, :, :p], v[:, :, :p]) for layer, (k, v) in full.kv.items()})
    sites = [Site(kind, 1) for kind in SiteKind if kind.in_attention]
    _, cache = model.run_stage(batch, start=1, stop=model.n_layers, hidden=full.cache["resid_pre.1"][:, p:],
                               capture=sites, prefix=prefix)
    for site in sites:
        kind = site.kind
        keys = s if kind.key_indexed and kind.fixed_width else s - p  # k, v: their positions are key positions
        assert cache[site].shape[kind.position_axis] == keys, site
        if not kind.fixed_width:
            assert cache[site].shape[-1] == s  # pattern: the last axis runs over every key position
    assert {k for k in SiteKind if k.key_indexed} == {SiteKind.K, SiteKind.V, SiteKind.PATTERN}


def test_module_level_kind_sets_are_derived_from_the_kinds():
    from interplab.engine.sites import PER_HEAD_KINDS, SPLIT_INPUT_KINDS

    assert PER_HEAD_KINDS == {k for k in SiteKind if k.per_head}
    assert SPLIT_INPUT_KINDS == (SiteKind.Q_IN, SiteKind.K_IN, SiteKind.V_IN)
    assert {k for k in SiteKind if not k.layered} == {SiteKind.EMBED, SiteKind.FINAL, SiteKind.LOGITS}
