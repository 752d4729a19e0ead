"""Extractive scores (upstream, downstream, informative) per layer × component × position.

    rows = extractive_scores(model, theta, w_f, data["ImplF"], counterfactuals(data["ImplF"]))

Definitions (derivations in ``docs/grafting.md``). For a prompt x with answer y and options O, the
mean-logit loss at the last position is ``L(θ; x) = -logit_y + mean_{o in O} logit_o``. For a
component c (a layer's MLP, or one attention head) at position p let ``h_θ(x)`` be its output (what
it adds to the residual stream, ``mlp_out`` / ``head_out``) and ``g_θ(x) = ∂L/∂h`` there. With
Δ = (finetuned weights) − θ:

* upstream      ``(g_θ(x) − g_{θ+Δ}(x)) · (h_θ(x) − h_θ(x_cf))``
* downstream    ``(h_θ(in_θ) − h_θ(in_{θ+Δ})) · g_θ(x)``: c's own weights stay θ, its input
  (the residual stream entering the layer, and for the MLP the stream after attention) comes from
  the θ run or the θ+Δ run;
* informative   ``−Σ_W (ΔW · x_W + Δb) · ∂L/∂y_W`` over c's linear maps W (input x_W, output y_W at
  position p, under θ): the first-order change of L when c's weights move by Δ at position p only.
  MLP: every linear map of the MLP. Head h: the rows of W_Q for head h and the columns of W_O that
  read head h. Component ``kv_head`` j: the rows of W_K and W_V for key/value head j (shared by a
  group of query heads under grouped-query attention, so reported on their own); ``attn_bias``:
  the output projection's bias (GPT-2, NeoX).

Every score is averaged over the prompts. The prompts (and their counterfactuals) must all have the
same number of tokens, so a position is the same template slot in every row; :func:`aligned` picks
such a subset. Scores need the single-process model (they run layers one at a time).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from interplab.analyses.grafting.data import Example
from interplab.analyses.grafting.evaluate import answer_ids
from interplab.analyses.grafting.weights import Weights, set_weights
from interplab.analyses.metrics import run_logits
from interplab.engine.backend import Backend
from interplab.engine.interventions import set_to

SCORES = ("upstream", "downstream", "informative")


@dataclass
class MeanLogitLoss:
    """``mean_i(-logit[answer_i] + mean_{o in options_i} logit[o])`` on last-position logits ``[b, vocab]``."""

    answers: torch.Tensor  # Long[b]
    options: torch.Tensor  # Long[b, k] (padded with the answer)
    mask: torch.Tensor  # Float[b, k]

    @classmethod
    def build(cls, tokenizer, examples: Sequence[Example]) -> MeanLogitLoss:
        answers, options = answer_ids(tokenizer, examples)
        k = max(len(o) for o in options)
        padded = answers[:, None].repeat(1, k)
        mask = torch.zeros(len(examples), k)
        for i, opts in enumerate(options):
            padded[i, : len(opts)] = opts
            mask[i, : len(opts)] = 1.0
        return cls(answers, padded, mask)

    def per_row(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        correct = logits.gather(1, self.answers[:, None].to(logits.device))[:, 0]
        mask = self.mask.to(logits.device)
        opts = (logits.gather(1, self.options.to(logits.device)) * mask).sum(1) / mask.sum(1)
        return -correct + opts

    def __call__(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return self.per_row(logits).mean()


# ------------------------------------------------------------------ prompts
def counterfactuals(examples: Sequence[Example], tokenizer) -> list[Example]:
    """For each example, another example of the set with the same token count (the next one that fits)."""
    from interplab.engine.tokens import encode

    lengths = [len(encode(tokenizer, ex.prompt)) for ex in examples]
    out = []
    for i, ex in enumerate(examples):
        j = next(
            (
                j % len(examples)
                for j in range(i + 1, i + len(examples))
                if lengths[j % len(examples)] == lengths[i] and examples[j % len(examples)].answer != ex.answer
            ),
            None,
        )
        out.append(examples[j] if j is not None else ex)
    return out


def aligned(
    tokenizer, examples: Sequence[Example], cfs: Sequence[Example], limit: int | None = None
) -> tuple[list[Example], list[Example]]:
    """The examples (and their counterfactuals) of the most common token count, with a distinct counterfactual."""
    from interplab.engine.tokens import encode

    lengths = [len(encode(tokenizer, ex.prompt)) for ex in examples]
    if not lengths:
        raise ValueError("no examples to score")
    common = Counter(lengths).most_common(1)[0][0]
    keep = [
        i
        for i, n in enumerate(lengths)
        if n == common and cfs[i].prompt != examples[i].prompt and len(encode(tokenizer, cfs[i].prompt)) == common
    ]
    if not keep:
        raise ValueError("no example has a counterfactual prompt of the same token count")
    keep = keep[:limit] if limit else keep
    return [examples[i] for i in keep], [cfs[i] for i in keep]


# ------------------------------------------------------------------ components
def _layer_modules(model, layer: int) -> dict[str, torch.nn.Module]:
    block = model.layer(layer)
    spec = model.spec

    def get(path):
        try:
            return block.get_submodule(path)
        except AttributeError:
            return None

    mlp = get(spec.mlp_down.rsplit(".", 1)[0])
    out = {"o": get(spec.o_proj)}
    if spec.qkv is not None and spec.qkv.fused is not None:
        out["qkv"] = get(spec.qkv.q)  # one module: one hook, split by the fused layout
    elif spec.qkv is not None:
        out.update(q=get(spec.qkv.q), k=get(spec.qkv.k), v=get(spec.qkv.v))
    else:
        attn = spec.o_proj.rsplit(".", 1)[0]
        out.update(q=get(f"{attn}.q_proj"), k=get(f"{attn}.k_proj"), v=get(f"{attn}.v_proj"))
    linears = [m for m in mlp.modules() if _is_linear(m)] if mlp is not None else []
    out.update({f"mlp{i}": m for i, m in enumerate(linears)})
    return {k: v for k, v in out.items() if v is not None}


def _is_linear(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def components(model) -> list[tuple[str, int | None]]:
    """The components of one layer, in the order of the score tensors' component axis."""
    out: list[tuple[str, int | None]] = [("mlp", None)]
    out += [("head", h) for h in range(model.n_heads)]
    out += [("kv_head", j) for j in range(model.n_kv_heads)]
    out.append(("attn_bias", None))
    return out


def _output_assignment(model, key: str, out_features: int) -> torch.Tensor:
    """Component index (see :func:`components`) of each output unit of an output-sliced map."""
    n, kv, hd = model.n_heads, model.n_kv_heads, model.head_dim
    head0, kv0 = 1, 1 + n
    if key.startswith("mlp"):
        return torch.zeros(out_features, dtype=torch.long)
    fused = model.spec.qkv.fused if model.spec.qkv is not None else None
    if fused == "blocks":  # [q | k | v], heads contiguous in each
        q = head0 + torch.arange(n).repeat_interleave(hd)
        k = kv0 + torch.arange(kv).repeat_interleave(hd)
        return torch.cat([q, k, k.clone()])
    if fused == "heads":  # per head [q_h k_h v_h]
        parts = [torch.cat([torch.full((hd,), head0 + h), torch.full((2 * hd,), kv0 + h)]) for h in range(n)]
        return torch.cat(parts).long()
    if key == "q":
        return head0 + torch.arange(n).repeat_interleave(hd)
    return kv0 + torch.arange(kv).repeat_interleave(hd)  # k or v


def _module_name(model, module) -> str:
    for name, m in model.model.named_modules():
        if m is module:
            return name
    raise KeyError("module not in model")


@contextmanager
def _informative_hooks(model, delta: Weights, seq_len: int):
    """Forward hooks adding ``eps[c, p] * (ΔW x + Δb)`` per component c and position p; yields the eps."""
    from transformers.pytorch_utils import Conv1D

    n_comp = len(components(model))
    eps = [torch.zeros(n_comp, seq_len, dtype=torch.float32, requires_grad=True) for _ in range(model.n_layers)]
    handles = []
    device, dtype = model.device, model.dtype
    try:
        for layer in range(model.n_layers):
            for key, module in _layer_modules(model, layer).items():
                name = _module_name(model, module)
                dw = delta[f"{name}.weight"].to(device, dtype)
                db = delta.get(f"{name}.bias")
                db = db.to(device, dtype) if db is not None else None
                transposed = isinstance(module, Conv1D)
                w_lin = dw.t() if transposed else dw  # [out, in]
                e = eps[layer]
                if key == "o":
                    in_assign = 1 + torch.arange(model.n_heads).repeat_interleave(model.head_dim)
                    bias_index = n_comp - 1

                    def input_hook(mod, args, output, w_lin=w_lin, db=db, e=e, in_assign=in_assign, bias_index=bias_index):
                        x = args[0]
                        scale = e.to(x.device, x.dtype)[in_assign].t()  # [s, in]
                        delta_y = torch.nn.functional.linear(x * scale[None, : x.shape[1]], w_lin)
                        if db is not None:
                            delta_y = delta_y + e.to(x.device, x.dtype)[bias_index][None, : x.shape[1], None] * db
                        return output + delta_y

                    handles.append(module.register_forward_hook(input_hook))
                else:
                    assign = _output_assignment(model, key, w_lin.shape[0])

                    def output_hook(mod, args, output, w_lin=w_lin, db=db, e=e, assign=assign):
                        x = args[0]
                        delta_y = torch.nn.functional.linear(x, w_lin, db)
                        scale = e.to(x.device, x.dtype)[assign].t()  # [s, out]
                        return output + delta_y * scale[None, : x.shape[1]]

                    handles.append(module.register_forward_hook(output_hook))
        yield eps
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------ scores
def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row sum of the dot product over the last axis: ``[b, s, (h,) d] → [s, (h)]``.

    One factor is a gradient of the batch-mean loss, i.e. the per-prompt gradient divided by the
    number of prompts, so the row sum is the mean over prompts of the per-prompt score."""
    return (a.float() * b.float()).sum(-1).sum(0)


def extractive_scores(
    backend: Backend,
    theta: Weights,
    tuned: Weights,
    examples: Sequence[Example],
    cfs: Sequence[Example],
) -> dict[str, torch.Tensor]:
    """Scores of Δ = ``tuned`` − ``theta`` on ``examples`` (counterfactual prompts ``cfs``, same lengths).

    Returns ``{score: Float[n_layers, n_components, seq_len]}`` with components as in
    :func:`components` (upstream/downstream are NaN for ``kv_head`` and ``attn_bias``). The model's
    weights are ``theta`` on return.
    """
    model = backend.local_model
    if model is None:
        raise TypeError(
            "extractive scores hook the model's modules in this process: they need the single-process model (parallel.stages: 1)"
        )
    tok = model.tokenizer
    batch = model.tokenize([ex.prompt for ex in examples])
    cf_batch = model.tokenize([ex.prompt for ex in cfs])
    if batch.padded or cf_batch.padded or batch.seq_len != cf_batch.seq_len:
        raise ValueError("scores need prompts and counterfactuals of one token count (see scores.aligned)")
    metric = MeanLogitLoss.build(tok, examples)
    n_layers, s = model.n_layers, batch.seq_len
    comps = components(model)
    sites = [f"mlp_out.{layer}" for layer in range(n_layers)] + [f"head_out.{layer}" for layer in range(n_layers)]
    resid = [f"resid_pre.{layer}" for layer in range(n_layers)]
    mids = [f"resid_mid.{layer}" for layer in range(n_layers)] if model.has_resid_mid else []

    set_weights(model, tuned)
    g_tuned = model.gradients(batch, metric, sites, logits="last").grads
    inputs = model.run(batch, capture=resid + mids, logits="none").cache
    set_weights(model, theta)
    base = model.gradients(batch, metric, sites, capture=sites, logits="last")
    h_cf = model.run(cf_batch, capture=sites, logits="none").cache

    nan = float("nan")
    up = torch.full((n_layers, len(comps), s), nan)
    down = torch.full((n_layers, len(comps), s), nan)
    heads = slice(1, 1 + model.n_heads)
    with torch.no_grad():
        for layer in range(n_layers):
            items = [set_to(f"resid_mid.{layer}", inputs[f"resid_mid.{layer}"])] if mids else []
            stage = model.stage_pass(
                batch,
                start=layer,
                stop=layer + 1,
                hidden=inputs[f"resid_pre.{layer}"],
                capture=[f"mlp_out.{layer}", f"head_out.{layer}"],
                interventions=items,
            )
            for kind, index in (("mlp_out", 0), ("head_out", heads)):
                site = f"{kind}.{layer}"
                g, h = base.grads[site], base.cache[site]
                u = _dot(g - g_tuned[site], h - h_cf[site])
                d = _dot(h - stage.cache[site], g)
                up[layer, index] = u.t() if kind == "head_out" else u
                down[layer, index] = d.t() if kind == "head_out" else d

    delta = {n: tuned[n] - theta[n] for n in theta}
    with torch.enable_grad(), _informative_hooks(model, delta, s) as eps:
        logits = run_logits(model.run(batch, logits="last", grad=True))
        loss = metric(logits, batch)
        grads = torch.autograd.grad(loss, eps)
    info = -torch.stack([g.detach() for g in grads])
    has_bias = [
        any(f"{_module_name(model, m)}.bias" in delta for k, m in _layer_modules(model, layer).items() if k == "o")
        for layer in range(n_layers)
    ]
    for layer, flag in enumerate(has_bias):
        if not flag:
            info[layer, -1] = nan
    return {"upstream": up, "downstream": down, "informative": info}


def score_rows(model, scores: dict[str, torch.Tensor], tokens: Sequence[str], extra: dict) -> list[dict]:
    """Long-format rows (score, layer, component, head, position, token, value) + ``extra`` columns."""
    comps = components(model)
    rows = []
    for name, values in scores.items():
        n_layers, _, s = values.shape
        for layer in range(n_layers):
            for c, (component, head) in enumerate(comps):
                for p in range(s):
                    v = float(values[layer, c, p])
                    if v != v:  # NaN: not defined for this component
                        continue
                    rows.append(
                        {
                            **extra,
                            "score": name,
                            "layer": layer,
                            "component": component,
                            "head": head,
                            "position": p,
                            "token": tokens[p],
                            "value": v,
                        }
                    )
    return rows
