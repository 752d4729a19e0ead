import pytest

from interplab.engine.sites import Site, SiteError, SiteKind, parse_sites


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
