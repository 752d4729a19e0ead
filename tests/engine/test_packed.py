"""Packed passes (interplab.engine.packed): rows end to end in one sequence, forks that compute only
the positions they change. Every row's logits equal its own plain run with its own interventions."""

from __future__ import annotations

import pytest
import torch

from interplab.engine import Intervention, InterventionError, steer
from interplab.engine.packed import PackedFork, layout, run_packed
from tests.conftest import PROMPTS, SHORT

TOL = dict(rtol=1e-5, atol=1e-5)  # another batch shape rounds differently


def direction(seed: int, d: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def alone(model, prompt: str, interventions) -> torch.Tensor:
    """The reference: the row's own plain run, its interventions addressed to row 0."""
    mine = [
        Intervention(i.site, i.op, value=i.value, positions=i.positions, rows=[0] if i.rows is not None else None)
        for i in interventions
    ]
    return tiny_logits(model, prompt, mine)


def tiny_logits(model, prompt, interventions):
    return model.run([prompt], interventions=interventions, logits="last").logits[0]


def _mlp_in_or_post(model) -> str:
    """``mlp_in`` where the family has it (not behind post-norms), else ``resid_post``."""
    from interplab.engine import SiteError

    try:
        model.validate_site("mlp_in.0")
    except SiteError:
        return "resid_post"
    return "mlp_in"


def test_rows_of_different_lengths_packed_equal_each_alone(tiny):
    prompts = [PROMPTS[0], SHORT[1], SHORT[0]]
    got = run_packed(tiny, tiny.tokenize(prompts), [])
    assert got.shape == (3, tiny.d_vocab)
    for r, prompt in enumerate(prompts):
        torch.testing.assert_close(got[r], tiny_logits(tiny, prompt, []), **TOL)


def test_forks_equal_their_own_runs(tiny):
    """Forks at several layers and start positions, from two base rows of different lengths, with
    interventions at every re-addressable kind (and one on a base row above every fork)."""
    m = tiny
    last = m.n_layers - 1
    prompts = [PROMPTS[0], SHORT[0]]
    forks = [PackedFork(0, 0, 3), PackedFork(1, 1, 2), PackedFork(0, 1, 0), PackedFork(0, last, 9), PackedFork(1, last, 5)]
    per_row = {
        0: [Intervention(f"attn_out.{last}", "scale", value=0.5, rows=[0], positions=[1])],
        1: [],
        2: [steer("resid_pre.0", direction(1, m.d_model), 3.0, rows=[2], positions=[3, -1])],
        3: [
            Intervention("mlp_out.1", "set", value=direction(2, m.d_model), rows=[3], positions=[2]),
            steer("resid_post.1", direction(3, m.d_model), rows=[3], positions=[4]),
        ],
        4: [Intervention("mlp_post.1", "scale", value=0.0, rows=[4], positions=[0, 6])],
        5: [Intervention(f"resid_pre.{last}", "set", value=direction(4, m.d_model), rows=[5], positions=[9])],
        6: [steer(f"{_mlp_in_or_post(m)}.{last}", direction(5, m.d_model), 2.0, rows=[6], positions=[-1])],
    }
    got = run_packed(m, m.tokenize(prompts), forks, [i for items in per_row.values() for i in items])
    sources = [0, 1, 0, 1, 0, 0, 1]
    for r, items in per_row.items():
        torch.testing.assert_close(got[r], alone(m, prompts[sources[r]], items), **TOL, msg=f"row {r}")


def test_a_selection_over_padding_keeps_its_unpacked_shape(tiny):
    """A value shaped like the padded batch ([b, s, d]) is matched entry by entry as in the plain
    pass; the padding positions it also covers are not in the sequence."""
    m = tiny
    batch = m.tokenize([PROMPTS[0], SHORT[1]])
    value = torch.randn(2, batch.seq_len, m.d_model, generator=torch.Generator().manual_seed(6))
    items = [Intervention("resid_post.0", "add", value=value), Intervention("mlp_out.1", "scale", value=0.5, rows=[1])]
    got = run_packed(m, batch, [], items)
    want = m.run(batch, interventions=items, logits="last").logits
    torch.testing.assert_close(got, want, **TOL)


def test_a_long_prompt_keeps_sliding_windows(tiny_models):
    """gemma2's tiny config alternates sliding-window (4) and full layers: a fork deep in a long prompt
    still sees only its window."""
    m = tiny_models("gemma2")
    assert m.sliding_window is not None and m.sliding_window < 10
    items = [steer("resid_pre.1", direction(7, m.d_model), rows=[1], positions=[8])]
    got = run_packed(m, m.tokenize([PROMPTS[1]]), [PackedFork(0, 1, 8)], items)
    torch.testing.assert_close(got[1], alone(m, PROMPTS[1], items), **TOL)
    torch.testing.assert_close(got[0], tiny_logits(m, PROMPTS[1], []), **TOL)


def test_the_layout_holds_each_row_from_its_start(tiny_models):
    m = tiny_models("llama")
    batch = m.tokenize([PROMPTS[0], SHORT[1]])
    n0, n1 = (int(x) for x in batch.lengths)
    lay = layout(batch, [PackedFork(0, 1, 10), PackedFork(1, 2, 1)], m.n_layers)
    assert lay.offsets.tolist() == [0, n0, n0 + n1, n0 + n1 + n0 - 10]
    assert lay.present == [n0 + n1, n0 + n1 + n0 - 10, n0 + n1 + n0 - 10 + n1 - 1][: m.n_layers]
    assert lay.size == n0 + n1 + (n0 - 10) + (n1 - 1)
    rows, positions = lay.tokens()
    assert rows.tolist() == [0] * n0 + [1] * n1 + [2] * (n0 - 10) + [3] * (n1 - 1)
    assert positions[n0 + n1 :].tolist() == list(range(10, n0)) + list(range(1, n1))


@pytest.mark.parametrize(
    ("forks", "items", "message"),
    [
        ([PackedFork(2, 1, 0)], [], r"forks\[0\]\.base 2: a fork copies one of the batch's rows 0..1"),
        ([PackedFork(0, 2, 0), PackedFork(0, 1, 0)], [], r"forks\[1\]\.layer 1: forks join in layer order"),
        ([PackedFork(1, 1, 40)], [], r"forks\[0\]\.start 40: row 1 has \d+ tokens to fork from"),
        (
            [PackedFork(0, 1, 5)],
            [steer("resid_pre.1", torch.ones(64), rows=[2], positions=[4])],
            r"row 2 forks at position 5, so it cannot be changed at position 4",
        ),
        (
            [PackedFork(0, 2, 5)],
            [steer("resid_post.1", torch.ones(64), rows=[2], positions=[6])],
            r"row 2 joins at layer 2, so it cannot be changed at resid_post\.1",
        ),
        ([], [Intervention("z.1", "set", value=0.0, rows=[0])], r"cannot re-address an intervention on z\.1"),
    ],
)
def test_forks_and_interventions_that_cannot_pack_are_refused(tiny_models, forks, items, message):
    m = tiny_models("llama")
    with pytest.raises((ValueError, InterventionError), match=message):
        run_packed(m, m.tokenize([PROMPTS[0], SHORT[1]]), forks, items)
