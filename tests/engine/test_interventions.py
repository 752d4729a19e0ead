"""Interventions: exact patching, per-row batches, steering, ablations."""

import pytest
import torch

from interplab.engine import Intervention, InterventionError, patch, set_to, steer, zero
from interplab.engine.sites import Site
from tests.conftest import PROMPTS

CLEAN = PROMPTS[0]
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def test_patching_every_clean_position_of_resid_pre0_restores_clean_logits(tiny):
    clean = tiny.run(CLEAN, capture=["resid_pre.0"])
    patched = tiny.run(CORRUPT, interventions=[patch("resid_pre.0", clean.cache["resid_pre.0"])])
    torch.testing.assert_close(patched.logits, clean.logits, rtol=0, atol=0)


def _sweep_sites(tiny):
    sites = ["resid_pre.1", "attn_out.0", "mlp_out.2", "resid_post.1", "mlp_post.1", "z.1", "q.0", "k.2", "v.1", "head_out.2", "pattern.1"]
    if tiny.has_resid_mid:
        sites.append("resid_mid.1")
    return sites


def test_per_row_patches_equal_one_at_a_time(tiny):
    """A batch where each row patches a different (site, position[, head]) equals separate runs."""
    clean = tiny.run(CLEAN, capture=_sweep_sites(tiny))
    n_pos = clean.batch.seq_len
    corrupt = tiny.tokenize([CORRUPT])
    for site in _sweep_sites(tiny):
        source = clean.cache[site]
        per_head = source.ndim == 4
        positions = torch.tensor([1, 4, n_pos - 1, 7])
        heads = torch.tensor([0, 3, 1, 2]) if per_head else None
        layout = source.transpose(1, 2) if site.startswith("pattern") else source  # canonical [b, q, h, k]
        rows = torch.arange(len(positions))
        batched = tiny.run(
            corrupt.repeat_rows(torch.zeros(len(positions), dtype=torch.long)),
            interventions=[patch(site, layout.expand(len(positions), *layout.shape[1:]), rows=rows, positions=positions, heads=heads, paired=True)],
            logits="last",
        ).logits
        for i in range(len(positions)):
            kwargs = {"positions": [int(positions[i])]}
            if per_head:
                kwargs["heads"] = [int(heads[i])]
                value = layout[0, positions[i], heads[i]]
            else:
                value = layout[0, positions[i]]
            single = tiny.run(corrupt, interventions=[set_to(site, value, **kwargs)], logits="last").logits
            torch.testing.assert_close(batched[i], single[0], rtol=0, atol=1e-5, msg=f"{site} row {i}")


def _canonical(site: str, value: torch.Tensor) -> torch.Tensor:
    """``[b, q, ...]`` for every site (``pattern`` is captured as ``[b, h, q, k]``)."""
    return value.transpose(1, 2) if site.startswith("pattern") else value


def test_patch_with_own_values_changes_nothing(tiny):
    sites = _sweep_sites(tiny)
    clean = tiny.run(CLEAN, capture=sites)
    for site in sites:
        again = tiny.run(CLEAN, interventions=[patch(site, _canonical(site, clean.cache[site]))])
        torch.testing.assert_close(again.logits, clean.logits, rtol=0, atol=1e-5, msg=site)


def test_patch_at_one_position_changes_exactly_what_causality_allows(tiny):
    """The corrupted run's value at the first differing token ``d``, set into the clean run: the site
    holds that value at ``d`` and its clean values elsewhere; logits before ``d`` are the clean ones
    (causal attention); at ``d`` they move; at ``d + 1`` they move only when a later attention reads
    position ``d`` (any layer before the last, or the last layer's keys/values/residual input), and
    otherwise nothing after ``d`` moves."""
    sites = _sweep_sites(tiny)
    corrupt = tiny.run(CORRUPT, capture=sites)
    differs = (tiny.tokenize([CLEAN]).input_ids[0] != corrupt.batch.input_ids[0]).nonzero()
    d = int(differs[0])
    assert len(differs) == 1 and 0 < d < corrupt.batch.seq_len - 1, "the prompts differ in one middle token"
    for site in sites:
        parsed = Site.parse(site)
        clean = tiny.run(CLEAN, capture=[site])  # the same capture as the patched run: the same kernels
        value = _canonical(site, corrupt.cache[site])[0, d]
        assert (value - _canonical(site, clean.cache[site])[0, d]).abs().max() > 1e-3, f"{site}: no difference to patch in"
        out = tiny.run(CLEAN, capture=[site], interventions=[set_to(site, value, positions=[d])])
        got, before = _canonical(site, out.cache[site])[0], _canonical(site, clean.cache[site])[0]
        torch.testing.assert_close(got[d], value, rtol=0, atol=0, msg=f"{site}: the patched value")
        others = torch.arange(len(got)) != d
        torch.testing.assert_close(got[others], before[others], rtol=0, atol=1e-5, msg=f"{site}: other positions")
        moved = (out.logits[0] - clean.logits[0]).abs().amax(-1)  # [q]
        torch.testing.assert_close(out.logits[0, :d], clean.logits[0, :d], rtol=0, atol=1e-5, msg=f"{site}: before d")
        assert moved[d] > 1e-3, f"{site}: patching position {d} left its logits unchanged ({moved[d]:.2e})"
        spreads = parsed.layer < tiny.n_layers - 1 or parsed.kind.value in ("resid_pre", "k", "v")
        if spreads:  # (only d + 1 for sure: a sliding-window layer may not reach further)
            assert moved[d + 1] > 1e-5, f"{site}: position {d + 1} did not see the patch ({moved.tolist()})"
        else:
            torch.testing.assert_close(out.logits[0, d + 1 :], clean.logits[0, d + 1 :], rtol=0, atol=1e-5,
                                       msg=f"{site}: after d (nothing later reads position {d})")


def test_resid_mid_intervention_sets_resid_mid(tiny):
    if not tiny.has_resid_mid:  # parallel residual (GPT-NeoX/Pythia): the site does not exist
        with pytest.raises(ValueError, match="no resid_mid"):
            tiny.run(CLEAN, interventions=[zero("resid_mid.1")])
        return
    target = torch.randn(tiny.d_model)
    out = tiny.run(CLEAN, capture=["resid_mid.1", "mlp_out.1", "resid_post.1"], interventions=[set_to("resid_mid.1", target, positions=[3])])
    torch.testing.assert_close(out.cache["resid_mid.1"][0, 3], target)
    torch.testing.assert_close(out.cache["resid_post.1"][0, 3], target + out.cache["mlp_out.1"][0, 3], atol=1e-5, rtol=0)


def test_steering_adds_a_vector_downstream(tiny):
    vector = torch.randn(tiny.d_model)
    base = tiny.run(CLEAN, capture=["resid_pre.2"])
    steered = tiny.run(CLEAN, capture=["resid_pre.2"], interventions=[steer("resid_post.1", vector, coeff=2.0)])
    torch.testing.assert_close(steered.cache["resid_pre.2"], base.cache["resid_pre.2"] + 2.0 * vector, atol=1e-5, rtol=0)


def test_zero_and_mean_ablation(tiny):
    from interplab.engine import mean_ablate

    zeroed = tiny.run(CLEAN, capture=["mlp_out.0"], interventions=[zero("mlp_out.0", positions=[2, -1])])
    assert zeroed.cache["mlp_out.0"][0, 2].abs().max() == 0
    assert zeroed.cache["mlp_out.0"][0, -1].abs().max() == 0
    assert zeroed.cache["mlp_out.0"][0, 1].abs().max() > 0
    reference = tiny.run(PROMPTS, capture=["z.1"]).cache["z.1"]
    mean = reference.mean(dim=(0, 1))  # [h, d]
    ablated = tiny.run(CLEAN, capture=["z.1"], interventions=[mean_ablate("z.1", mean)])
    torch.testing.assert_close(ablated.cache["z.1"][0], mean.expand_as(ablated.cache["z.1"][0]))


def test_resample_ablation_takes_other_rows(tiny):
    other = tiny.run(PROMPTS, capture=["attn_out.1"])
    perm = torch.tensor([1, 0])
    out = tiny.run(PROMPTS, capture=["attn_out.1"], interventions=[patch("attn_out.1", other.cache["attn_out.1"], rows=[0, 1], source_rows=perm)])
    torch.testing.assert_close(out.cache["attn_out.1"][0], other.cache["attn_out.1"][1])


def test_bad_interventions_are_named(tiny):
    with pytest.raises(InterventionError, match=r"value of shape \(3,\) does not fit"):
        tiny.run(CLEAN, interventions=[set_to("resid_pre.0", torch.zeros(3))])
    with pytest.raises(InterventionError, match="position out of range"):
        tiny.run(CLEAN, interventions=[zero("resid_pre.0", positions=[99])])
    with pytest.raises(InterventionError, match="not a per-head site"):
        Intervention("resid_pre.0", "set", value=0.0, heads=[1])
    with pytest.raises(InterventionError, match="paired=True"):
        tiny.run(CLEAN, interventions=[zero("z.0", heads=[0, 1])])
