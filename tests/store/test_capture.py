"""A hand-built engine CaptureChunk (real torch tensors) → store rows."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from interplab.engine.sites import Site  # noqa: E402
from interplab.engine.stream import CaptureChunk  # noqa: E402


def _chunk(index: int = 0) -> CaptureChunk:
    g = torch.Generator().manual_seed(index)
    b, p, s, d, h, dh = 2, 3, 4, 8, 2, 4
    tokens = [["<s>", "a", "b", "c"], ["<s>", "x"]]
    return CaptureChunk(
        index=index,
        prompt_ids=[10 * index, 10 * index + 1],
        token_ids=torch.tensor([[1, 5, 6, 7], [1, 9, 0, 0]]),
        lengths=[4, 2],
        tokens=tokens,
        positions=torch.tensor([[1, 2, 3], [0, 1, 0]]),
        valid=torch.tensor([[True, True, True], [True, True, False]]),
        acts={
            Site("resid_pre", 1): torch.randn(b, p, d, generator=g),
            Site("z", 0): torch.randn(b, p, h, dh, generator=g).to(torch.bfloat16),
            Site("z", 1, head=1): torch.randn(b, p, 1, dh, generator=g),
            Site("pattern", 0): torch.rand(b, h, p, s, generator=g),
        },
    )


def test_capture_chunk_rows(store):
    chunk = _chunk()
    w = store.begin_run("capture", model="tiny", spec={})
    with pytest.warns(UserWarning, match="pattern"):
        w.write_capture_chunk(chunk)
    with pytest.warns(UserWarning):
        w.write_capture_chunk(chunk)  # idempotent: the retry replaces the chunk
    assert w.written_chunks() == {0}
    w.commit()

    rows = store.sql(
        "SELECT prompt_id, position, token_id, token FROM activations WHERE site = 'resid_pre' "
        "ORDER BY prompt_id, position"
    ).to_pylist()
    assert [(r["prompt_id"], r["position"], r["token_id"], r["token"]) for r in rows] == [
        (0, 1, 5, "a"), (0, 2, 6, "b"), (0, 3, 7, "c"), (1, 0, 1, "<s>"), (1, 1, 9, "x"),
    ]
    resid = chunk.acts[Site("resid_pre", 1)]
    expected = torch.cat([resid[0], resid[1, :2]]).half().float().numpy()
    np.testing.assert_array_equal(store.export(w.run_id, "resid_pre.1"), expected)

    z = chunk.acts[Site("z", 0)]  # bfloat16 is stored widened to float32, losslessly
    got = store.export(w.run_id, "z.0", head=1)
    np.testing.assert_array_equal(got, torch.cat([z[0, :, 1], z[1, :2, 1]]).float().numpy())
    assert {f.dtype for f in store.run(w.run_id).files if f.site == "z" and f.layer == 0} == {"float32"}
    assert store.export(w.run_id, "z.1.1").shape == (5, 4)
    assert store.sql("SELECT count(*) FROM activations WHERE site = 'pattern'").column(0)[0].as_py() == 0

    prompts = store.sql("SELECT prompt_id, n_tokens, tokens FROM prompts ORDER BY prompt_id").to_pylist()
    assert prompts == [
        {"prompt_id": 0, "n_tokens": 4, "tokens": ["<s>", "a", "b", "c"]},
        {"prompt_id": 1, "n_tokens": 2, "tokens": ["<s>", "x"]},
    ]
    assert isinstance(store.export_torch(w.run_id, "resid_pre.1"), torch.Tensor)


def test_unpadded_chunk_of_many_sites_written_in_parallel(store):
    """Every position valid (the no-copy path) and more sites than writer threads: each site's rows
    land in its own file, in prompt-major order, exactly once."""
    g = torch.Generator().manual_seed(3)
    b, p, d, h = 3, 4, 6, 2
    acts = {Site("resid_post", layer): torch.randn(b, p, d, generator=g) for layer in range(5)}
    acts[Site("q", 2)] = torch.randn(b, p, h, d, generator=g)
    chunk = CaptureChunk(
        index=7, prompt_ids=[4, 5, 6], token_ids=torch.arange(b * p).view(b, p), lengths=[p] * b,
        tokens=[[f"t{i}.{j}" for j in range(p)] for i in range(b)], positions=torch.arange(p).expand(b, p),
        valid=torch.ones(b, p, dtype=torch.bool), acts=acts,
    )
    w = store.begin_run("capture", model="tiny", spec={})
    w.write_capture_chunk(chunk, dtype="float32")
    w.commit()
    for layer in range(5):
        np.testing.assert_array_equal(store.export(w.run_id, f"resid_post.{layer}"), acts[Site("resid_post", layer)].reshape(b * p, d).numpy())
    np.testing.assert_array_equal(store.export(w.run_id, "q.2", head=1), acts[Site("q", 2)][:, :, 1].reshape(b * p, d).numpy())
    rows = store.sql("SELECT prompt_id, position, token FROM activations WHERE site = 'resid_post' AND layer = 4 ORDER BY prompt_id, position").to_pylist()
    assert [(r["prompt_id"], r["position"], r["token"]) for r in rows] == [(4 + i, j, f"t{i}.{j}") for i in range(b) for j in range(p)]
    assert store.sql("SELECT count(*) FROM activations").column(0)[0].as_py() == 5 * b * p + h * b * p
