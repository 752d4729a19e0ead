"""Shared pieces of the runtime tests: metrics (picklable, they run in the last stage) and a sweep."""

from __future__ import annotations

import torch

from interplab.engine import patch

ANSWER, WRONG = 5, 9
CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Alice went to the park, Alice gave a ball to",
]
CORRUPT = [
    "When Mary and John went to the store, Mary gave a drink to",
    "When Tom and Alice went to the park, Tom gave a ball to",
]


def logit_diff(logits, batch):
    return (logits[:, ANSWER] - logits[:, WRONG]).mean()


def next_token_loss(logits, batch):
    targets = batch.input_ids[:, 1:]
    mask = batch.attention_mask[:, 1:].bool()
    flat = logits[:, :-1][mask]
    return torch.nn.functional.cross_entropy(flat, targets[mask])


def sites_of(model) -> list[str]:
    """Sites of every kind spread over all layers (so every stage owns some)."""
    out = ["embed", "resid_pre.0", "attn_out.0", "z.0", "pattern.1", "head_out.1", "q.1.2", "mlp_post.1",
           "resid_pre.2", "k.2", "v.2", "mlp_out.2", "resid_post.2", "final", "logits"]
    if model.has_resid_mid:
        out.append("resid_mid.1")
    return out


def resid_sweep(model, clean, corrupt, layers):
    """Patch clean ``resid_pre.L`` into the corrupted run at every (prompt, position): one pass per layer,
    one paired patch per row (what patching sweeps do). Returns ``[layers, prompts * positions]``."""
    clean_batch = model.tokenize(clean)
    corrupt_batch = model.tokenize(corrupt)
    b, s = corrupt_batch.size, corrupt_batch.seq_len
    rows = torch.arange(b * s)
    source_rows = rows // s
    positions = rows % s
    batch = corrupt_batch.repeat_rows(source_rows)
    sites = [f"resid_pre.{layer}" for layer in layers]
    cache = model.run(clean_batch, capture=sites, logits="none").cache
    out = []
    for site in sites:
        item = patch(site, cache[site], rows=rows, positions=positions, source_rows=source_rows, paired=True)
        logits = model.run(batch, interventions=[item], logits="last").logits
        out.append(logits[:, ANSWER] - logits[:, WRONG])
    return torch.stack(out)
