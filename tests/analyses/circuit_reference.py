"""Independent references for circuit discovery on GPT-2-family models, written plainly.

``graph_forward`` recomputes a GPT-2 model from its weights with every destination's input formed
explicitly as the sum of source outputs (each source clean or corrupted per edge), one head at a
time. It shares no code with ``interplab.analyses.circuits`` or the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layout(n_layers: int, n_heads: int):
    """Source and destination indices in the circuit graph's order (re-derived here)."""
    heads = {}
    mlps = {}
    index = 1
    for layer in range(n_layers):
        for h in range(n_heads):
            heads[(layer, h)] = index
            index += 1
        mlps[layer] = index
        index += 1
    dests = {}
    j = 0
    for layer in range(n_layers):
        for which in "qkv":
            for h in range(n_heads):
                dests[(layer, h, which)] = j
                j += 1
        dests[(layer, "mlp")] = j
        j += 1
    dests["logits"] = j
    return heads, mlps, dests


def mib_names(n_layers: int, n_heads: int) -> tuple[list[str], list[str]]:
    """Source and destination names in the graph's order, as MIB/EAP-IG write them (re-derived here)."""
    heads, mlps, dests = layout(n_layers, n_heads)
    sources = {0: "input"} | {i: f"a{layer}.h{h}" for (layer, h), i in heads.items()} | {i: f"m{layer}" for layer, i in mlps.items()}
    names = {}
    for key, j in dests.items():
        if key == "logits":
            names[j] = "logits"
        elif key[1] == "mlp":
            names[j] = f"m{key[0]}"
        else:
            names[j] = f"a{key[0]}.h{key[1]}<{key[2]}>"
    return [sources[i] for i in range(len(sources))], [names[j] for j in range(len(names))]


def reads_after_write(src: str, dst: str, parallel: bool) -> bool:
    """Whether ``dst`` (an MIB destination name) reads the stream after ``src`` writes to it."""
    if src == "input" or dst == "logits":
        return True
    src_layer = int(src[1:].split(".")[0])
    dst_layer = int(dst[1:].split(".")[0].split("<")[0])
    if src_layer != dst_layer:
        return src_layer < dst_layer
    return dst.startswith("m") and src.startswith("a") and not parallel  # the MLP reads its layer's heads


def graph_forward(hf, ids: torch.Tensor, *, corrupt=None, patched=None):
    """Returns (last-position logits, source outputs [U x [b, s, d]], dest inputs {index: [b, s, d]})."""
    tr = hf.transformer
    cfg = hf.config
    n_heads, d = cfg.n_head, cfg.n_embd
    hd = d // n_heads
    heads, mlps, dests = layout(cfg.n_layer, n_heads)
    b, s = ids.shape
    sources = [tr.wte(ids) + tr.wpe(torch.arange(s))[None]]
    biases = torch.zeros(d)
    inputs = {}

    def read(dest: int, upstream: int) -> torch.Tensor:
        total = biases.expand(b, s, d)
        for u in range(upstream):
            use_corrupt = patched is not None and bool(patched[u, dest])
            total = total + (corrupt[u] if use_corrupt else sources[u])
        inputs[dest] = total
        return total

    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for layer, block in enumerate(tr.h):
        first = len(sources)
        weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias
        outs = []
        for h in range(n_heads):
            qkv = []
            for c, which in enumerate("qkv"):
                x = read(dests[(layer, h, which)], first)
                normed = F.layer_norm(x, (d,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
                cols = slice(c * d + h * hd, c * d + (h + 1) * hd)
                qkv.append(normed @ weight[:, cols] + bias[cols])
            q, k, v = qkv
            scores = (q @ k.transpose(1, 2)) / hd**0.5
            pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            outs.append((pattern @ v) @ block.attn.c_proj.weight[h * hd : (h + 1) * hd])
        sources += outs
        biases = biases + block.attn.c_proj.bias
        x = read(dests[(layer, "mlp")], first + n_heads)
        sources.append(block.mlp(F.layer_norm(x, (d,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)))
    x = read(dests["logits"], len(sources))
    logits = hf.lm_head(tr.ln_f(x))[:, -1]
    return logits, sources, inputs


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(len(answer))
    return logits[rows, answer] - logits[rows, wrong]


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)
