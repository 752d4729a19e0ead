"""Extractive scores against independent computations on a tiny Llama (GQA: 4 query heads, 2 kv heads).

The references use a separate transformers copy of the model (``build_tiny``), plain forward hooks,
``retain_grad`` and finite differences; nothing from ``interplab.analyses.grafting.scores`` except the
function under test.
"""

from __future__ import annotations

import pytest
import torch

from interplab import load_model
from interplab.analyses.grafting.data import examples_from_records
from interplab.analyses.grafting.scores import components, extractive_scores
from interplab.analyses.grafting.weights import get_weights
from interplab.models.tiny import build_tiny

PEOPLE = ["Mary", "John", "Alice", "Bob"]
LANGS = [" French", " English", " Italian", " German"]
X = [f"The people in the city {p} is from speak" for p in PEOPLE]
CF = X[1:] + X[:1]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = load_model("tiny-llama", dtype="float64")
    theta = get_weights(model)
    theta = {n: v.double() for n, v in theta.items()}
    gen = torch.Generator().manual_seed(1)
    tuned = {n: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for n, v in theta.items()}
    data = examples_from_records({"ImplF": [{"prompt": x, "answer": a} for x, a in zip(X, LANGS)]})
    cfs = examples_from_records({"ImplF": [{"prompt": x, "answer": a} for x, a in zip(CF, LANGS[1:] + LANGS[:1])]})
    scores = extractive_scores(model, theta, tuned, data["ImplF"], cfs["ImplF"])
    answers = torch.tensor([model.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in LANGS])
    ids = model.tokenize(X).input_ids
    cf_ids = model.tokenize(CF).input_ids
    return model, theta, tuned, scores, answers, ids, cf_ids


def hf_model(weights):
    model, _ = build_tiny("llama")
    model = model.double().eval()
    model.set_attn_implementation("eager")
    model.load_state_dict({**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}, strict=False)
    return model


def loss_of(logits, answers, reduce="mean"):
    """Mean-logit loss; ``reduce="sum"`` makes each row's gradient that of its own prompt's loss."""
    last = logits[:, -1].double()
    per_row = -last[torch.arange(len(answers)), answers] + last[:, answers].mean(1)
    return per_row.sum() if reduce == "sum" else per_row.mean()


class Recorder:
    """Per layer: MLP output, o_proj input (z) and output, with gradients retained."""

    def __init__(self, model, replace_input=None):
        self.mlp, self.z, self.o = {}, {}, {}
        self.resid_pre, self.resid_mid = {}, {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.mlp.register_forward_hook(self._keep(self.mlp, i)))
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._keep_in(self.z, i)))
            self.handles.append(layer.self_attn.o_proj.register_forward_hook(self._keep(self.o, i)))
            self.handles.append(layer.post_attention_layernorm.register_forward_pre_hook(self._keep_in(self.resid_mid, i)))
            self.handles.append(layer.register_forward_pre_hook(self._layer_in(i, replace_input), with_kwargs=True))

    def _keep(self, store, i):
        def hook(mod, args, out):
            if out.requires_grad:
                out.retain_grad()
            store[i] = out
        return hook

    def _keep_in(self, store, i):
        def hook(mod, args):
            store[i] = args[0]
        return hook

    def _layer_in(self, i, replace):
        def hook(mod, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.resid_pre[i] = hidden
            if replace is not None and i in replace:
                if args:
                    return (replace[i], *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": replace[i]}
            return None
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def head_outputs(model, layer, z):
    """``[b, s, h, d]``: z_h @ W_O[:, h]^T per head."""
    w = model.model.layers[layer].self_attn.o_proj.weight
    n = model.config.num_attention_heads
    hd = z.shape[-1] // n
    return torch.stack([z[..., h * hd:(h + 1) * hd] @ w[:, h * hd:(h + 1) * hd].t() for h in range(n)], dim=2)


def run(model, ids, answers, replace=None, grad=True):
    rec = Recorder(model, replace)
    try:
        with torch.set_grad_enabled(grad):
            logits = model(ids).logits
            loss = loss_of(logits, answers, "sum")
            if grad:
                loss.backward()
    finally:
        rec.close()
    return rec, loss


def test_upstream_and_downstream_match_hooks(setup):
    model, theta, tuned, scores, answers, ids, cf_ids = setup
    base_m, tuned_m = hf_model(theta), hf_model(tuned)
    base, _ = run(base_m, ids, answers)
    fine, _ = run(tuned_m, ids, answers)
    cf, _ = run(base_m, cf_ids, answers, grad=False)
    for layer in range(model.n_layers):
        g0, g1 = base.mlp[layer].grad, fine.mlp[layer].grad
        want = ((g0 - g1) * (base.mlp[layer] - cf.mlp[layer])).sum(-1).mean(0)
        torch.testing.assert_close(scores["upstream"][layer, 0], want.detach().float(), atol=1e-5, rtol=1e-4)
        h0, hcf = head_outputs(base_m, layer, base.z[layer]), head_outputs(base_m, layer, cf.z[layer])
        go0, go1 = base.o[layer].grad, fine.o[layer].grad
        want = ((go0 - go1)[:, :, None] * (h0 - hcf)).sum(-1).mean(0)  # [s, h]
        torch.testing.assert_close(scores["upstream"][layer, 1:5], want.t().detach().float(), atol=1e-5, rtol=1e-4)
        # downstream: component with weights θ fed the finetuned model's inputs
        mlp_block = base_m.model.layers[layer]
        with torch.no_grad():
            h_in = mlp_block.mlp(mlp_block.post_attention_layernorm(fine.resid_mid[layer]))
        want = ((base.mlp[layer] - h_in) * g0).sum(-1).mean(0)
        torch.testing.assert_close(scores["downstream"][layer, 0], want.detach().float(), atol=1e-5, rtol=1e-4)
        swapped, _ = run(base_m, ids, answers, replace={layer: fine.resid_pre[layer].detach()}, grad=False)
        h_sw = head_outputs(base_m, layer, swapped.z[layer])
        want = ((h0 - h_sw) * go0[:, :, None]).sum(-1).mean(0)
        torch.testing.assert_close(scores["downstream"][layer, 1:5], want.t().detach().float(), atol=1e-5, rtol=1e-4)


def test_informative_matches_autograd_per_position(setup):
    """−Σ_W (ΔW x_p)·∂L/∂y_p over the component's maps, from retained gradients of every projection."""
    model, theta, tuned, scores, answers, ids, _ = setup
    base_m = hf_model(theta)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    xs, ys, handles = {}, {}, []
    for i, layer in enumerate(base_m.model.layers):
        for name in names:
            def hook(mod, args, out, key=(i, name)):
                xs[key] = args[0]
                out.retain_grad()
                ys[key] = out
            handles.append(layer.get_submodule(name).register_forward_hook(hook))
    loss_of(base_m(ids).logits, answers, "sum").backward()
    for h in handles:
        h.remove()
    n, kv, hd = 4, 2, 16
    for i in range(model.n_layers):
        def term(name, out_slice=None, in_slice=None):
            key = f"model.layers.{i}.{name}.weight"
            dw = tuned[key] - theta[key]
            x, g = xs[(i, name)], ys[(i, name)].grad
            if in_slice is not None:
                x, dw = x[..., in_slice], dw[:, in_slice]
            dy = x @ dw.t()
            if out_slice is not None:
                dy, g = dy[..., out_slice], g[..., out_slice]
            return -(dy * g).sum(-1).mean(0)
        mlp = term("mlp.gate_proj") + term("mlp.up_proj") + term("mlp.down_proj")
        torch.testing.assert_close(scores["informative"][i, 0], mlp.detach().float(), atol=1e-5, rtol=1e-4)
        for h in range(n):
            s = slice(h * hd, (h + 1) * hd)
            want = term("self_attn.q_proj", out_slice=s) + term("self_attn.o_proj", in_slice=s)
            torch.testing.assert_close(scores["informative"][i, 1 + h], want.detach().float(), atol=1e-5, rtol=1e-4)
        for j in range(kv):
            s = slice(j * hd, (j + 1) * hd)
            want = term("self_attn.k_proj", out_slice=s) + term("self_attn.v_proj", out_slice=s)
            torch.testing.assert_close(scores["informative"][i, 1 + n + j], want.detach().float(), atol=1e-5, rtol=1e-4)
    assert torch.isnan(scores["informative"][:, -1]).all()  # no output-projection bias in Llama


def test_informative_sums_equal_parameter_gradients_and_finite_differences(setup):
    """Σ_p informative[c] = −⟨∂L/∂W, Δ_c⟩ (parameter gradients) ≈ −d/dε L(θ + εΔ_c) (central differences).

    The differences are loose (1e-2): transformers' Llama keeps softmax and rotary tables in float32
    even in a float64 model, which leaves ~1e-7 noise in L."""
    model, theta, tuned, scores, answers, ids, _ = setup
    comps = components(model)
    hd = 16
    cases = {("mlp", None): [(m, None, None) for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")],
             ("head", 2): [("self_attn.q_proj", slice(32, 48), None), ("self_attn.o_proj", None, slice(32, 48))],
             ("kv_head", 1): [("self_attn.k_proj", slice(hd, 2 * hd), None), ("self_attn.v_proj", slice(hd, 2 * hd), None)]}

    def restricted(layer, parts):
        out = {}
        for name, rows, cols in parts:
            key = f"model.layers.{layer}.{name}.weight"
            delta = torch.zeros_like(theta[key])
            r = slice(None) if rows is None else rows
            c = slice(None) if cols is None else cols
            delta[r, c] = (tuned[key] - theta[key])[r, c]
            out[key] = delta
        return out

    def loss_at(eps, deltas):
        weights = {**theta, **{k: theta[k] + eps * d for k, d in deltas.items()}}
        with torch.no_grad():
            return float(loss_of(hf_model(weights)(ids).logits, answers))

    base_m = hf_model(theta)
    loss_of(base_m(ids).logits, answers).backward()
    params = dict(base_m.named_parameters())
    eps = 1e-3
    for layer in (0, 2):
        for comp, parts in cases.items():
            deltas = restricted(layer, parts)
            want = -sum(float((params[k].grad * d).sum()) for k, d in deltas.items())
            got = float(scores["informative"][layer, comps.index(comp)].sum())
            assert got == pytest.approx(want, rel=1e-5, abs=1e-8), (layer, comp)
            fd = -(loss_at(eps, deltas) - loss_at(-eps, deltas)) / (2 * eps)
            assert got == pytest.approx(fd, rel=1e-2, abs=1e-5), (layer, comp)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gpt_neox"])
def test_informative_with_biases_and_fused_projections(family):
    """Other layouts: Conv1D + fused [q|k|v] + biases (GPT-2), q/k/v biases (Qwen2), per-head fused qkv
    (NeoX). Per layer, the scores of all components sum to −⟨∂L/∂θ, Δ⟩ over the layer's linear maps and
    biases; GPT-2's head 1 and its MLP are checked on their own (column/row slices by hand)."""
    model = load_model(f"tiny-{family}", dtype="float64")
    theta = {n: v.double() for n, v in get_weights(model).items()}
    gen = torch.Generator().manual_seed(2)
    tuned = {n: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for n, v in theta.items()}
    words = ["Mary", "John", "Alice"]
    data = examples_from_records({"ImplF": [{"prompt": f"The people in the city {w} is from speak", "answer": a}
                                            for w, a in zip(words, LANGS)]})["ImplF"]
    scores = extractive_scores(model, theta, tuned, data, data[1:] + data[:1])["informative"]
    answers = torch.tensor([model.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in LANGS[:3]])
    ids = model.tokenize([ex.prompt for ex in data]).input_ids
    model.model.zero_grad()
    with torch.enable_grad():
        loss_of(model.model(ids).logits, answers).backward()
    params = dict(model.model.named_parameters())
    prefix = f"{model.spec.base}.{model.spec.layers}."
    norms = ("ln", "norm", "layernorm")
    for layer in range(model.n_layers):
        names = [n for n in params if n.startswith(f"{prefix}{layer}.") and not any(k in n.split(".")[-2] for k in norms)]
        want = -sum(float((params[n].grad * (tuned[n] - theta[n])).sum()) for n in names)
        assert float(torch.nan_to_num(scores[layer]).sum()) == pytest.approx(want, rel=1e-5, abs=1e-8), (family, layer)
    if family == "gpt2":
        d, hd, h = 64, 16, 1
        block = f"{prefix}0."

        def inner(name, index):
            return float((params[name].grad[index] * (tuned[name] - theta[name])[index]).sum())

        cols = slice(h * hd, (h + 1) * hd)
        head = inner(block + "attn.c_attn.weight", (slice(None), cols)) + inner(block + "attn.c_attn.bias", cols) \
            + inner(block + "attn.c_proj.weight", (cols, slice(None)))
        assert float(scores[0, 1 + h].sum()) == pytest.approx(-head, rel=1e-5, abs=1e-8)
        kv = slice(d + h * hd, d + (h + 1) * hd), slice(2 * d + h * hd, 2 * d + (h + 1) * hd)
        kv_head = sum(inner(block + "attn.c_attn.weight", (slice(None), c)) + inner(block + "attn.c_attn.bias", c) for c in kv)
        assert float(scores[0, 1 + 4 + h].sum()) == pytest.approx(-kv_head, rel=1e-5, abs=1e-8)
        mlp = sum(inner(block + f"mlp.{m}.{p}", slice(None)) for m in ("c_fc", "c_proj") for p in ("weight", "bias"))
        assert float(scores[0, 0].sum()) == pytest.approx(-mlp, rel=1e-5, abs=1e-8)
        assert float(scores[0, -1].sum()) == pytest.approx(-inner(block + "attn.c_proj.bias", slice(None)), rel=1e-5, abs=1e-8)
