"""The generic patching driver: exact activation patching and attribution patching (AtP).

Exact patching puts many patches in one forward pass: every batch row is one (patch, prompt) pair
carrying its own paired intervention (site, position, head, value). Rows are ordered by layer, and
on a backend that can start mid-model (``run_stage``) each batch starts at its lowest patched layer
from the target run's cached ``resid_pre``: layers before a patch are not recomputed.

AtP (Nanda 2023; Kramar et al. 2024) estimates every patch from two forward passes and one
backward pass: ``m(patched) ~= m(target) + (a_source - a_target) . dm/da_target``, summed over the
patched positions/heads' activation dimensions.

Directions: ``denoise`` patches clean activations into the corrupted run; ``noise`` corrupted into
clean. Ablations (``zero``, ``mean`` over the dataset's target run, ``resample`` from a seeded
derangement of prompts) replace the clean run's activations.

Background interventions (``background``: e.g. a stored direction ablated or steered, from a spec's
``interventions``) apply in every forward pass of the analysis: the clean and corrupted runs, every
patched run and AtP's backward pass. The baselines and the source activations are then those of the
intervened model, and at a site with both, a patch comes after the background intervention, so it
writes the (intervened) source value. With a background, patched runs run the whole model instead of
starting mid-model, since the cached ``resid_pre`` a mid-model start joins at is fixed per layer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch

from interplab.analyses.metrics import MetricInputs, get_metric, metric_vocab, run_logits
from interplab.analyses.patching.result import PatchingResult, pearson
from interplab.analyses.patching.sweeps import Patch, Sweep, SweepError
from interplab.analyses.tasks.pairs import PairSet
from interplab.engine.backend import Backend
from interplab.engine.interventions import Intervention
from interplab.engine.plan import KVPrefix
from interplab.engine.results import StageRequest
from interplab.engine.sites import Site, SiteKind
from interplab.engine.tokens import TokenBatch
from interplab.engine.work import LayerWork

Direction = Literal["denoise", "noise"]
Method = Literal["exact", "atp", "both"]
Ablation = Literal["zero", "mean", "resample"]


def _canonical(site: Site, value: torch.Tensor) -> torch.Tensor:
    return site.kind.to_canonical(value)


def default_batch_rows(model, seq_len: int, memory_mb: int = 1024) -> int:
    """Rows per forward pass that keep transient activations within ``memory_mb``."""
    per_token = 6 * model.d_model + 3 * model.d_mlp + 2 * model.n_heads * seq_len
    per_row = 4 * (seq_len * per_token + 2 * model.d_vocab)
    return max(1, min(1024, (memory_mb << 20) // per_row))


# patched positions sharing a batch, which starts at the block's lowest: with each prompt's prefix
# held once, 1 (a batch per position, each row computing only its own positions) is the fastest
POSITION_BLOCK = 1


class _Setup:
    """Clean/corrupted runs, the target and source activations, metric inputs and baselines."""

    def __init__(
        self,
        model: Backend,
        pairs: PairSet,
        sweeps: Sequence[Sweep],
        direction: str,
        metric: str,
        ablation: str | None,
        seed: int,
        need_resid: bool,
        background: Sequence[Intervention] = (),
    ):
        if direction not in ("denoise", "noise"):
            raise SweepError(f"direction must be 'denoise' or 'noise', got {direction!r}")
        if ablation not in (None, "zero", "mean", "resample"):
            raise SweepError(f"ablation must be zero, mean or resample, got {ablation!r}")
        if any("position" in s.by for s in sweeps) and not pairs.same_length:
            raise SweepError(
                "sweeps by position need every prompt to have the same number of tokens; got lengths "
                f"{sorted(set(pairs.clean.lengths.tolist()))}. Use one template, or sweep by [layer] / [layer, head]"
            )
        self.model, self.pairs, self.sweeps = model, pairs, list(sweeps)
        self.background = list(background)
        self.metric = get_metric(metric)
        self.metric_name = metric
        n_layers = model.n_layers
        self.sites = [s.site(layer) for s in sweeps for layer in range(n_layers)]
        extra = [Site(SiteKind.RESID_PRE, layer) for layer in range(n_layers)] if need_resid else []
        capture = list(dict.fromkeys(self.sites + extra))
        self.can_skip = need_resid  # every backend can start a pass mid-model (run_stages)
        prefix_ok = self.can_skip and pairs.same_length and not pairs.clean.padded
        clean_is_target = ablation is not None or direction == "noise"
        # patched passes reuse the target run's keys/values: only that run keeps them
        clean = model.run(
            pairs.clean, capture=capture, interventions=self.background, logits="last", keep_kv=prefix_ok and clean_is_target
        )
        corrupted = model.run(
            pairs.corrupted,
            capture=capture,
            interventions=self.background,
            logits="last",
            keep_kv=prefix_ok and not clean_is_target,
        )
        clean_logprobs = run_logits(clean).float().log_softmax(-1)
        self.inputs = MetricInputs(pairs.answer, pairs.wrong, clean_logprobs)
        # patched passes unembed only the columns the metric reads (logit_diff: answer and wrong)
        self.vocab, self.vocab_inputs = metric_vocab(metric, self.inputs)
        self.clean_per_prompt = self.metric(run_logits(clean), self.inputs).double()
        self.corrupted_per_prompt = self.metric(run_logits(corrupted), self.inputs).double()
        self.baselines = {"clean": float(self.clean_per_prompt.mean()), "corrupted": float(self.corrupted_per_prompt.mean())}
        if clean_is_target:
            target, source, self.target_batch = clean, corrupted, pairs.clean
        else:
            target, source, self.target_batch = corrupted, clean, pairs.corrupted
        self.target_cache = target.cache
        self.target_kv = target.kv
        self.target_per_prompt = self.metric(run_logits(target), self.inputs).double()
        n = pairs.size
        self.source_rows = torch.arange(n)
        if ablation == "resample":
            gen = torch.Generator().manual_seed(seed)
            perm = torch.randperm(n, generator=gen)
            if n > 1:
                perm = torch.where(perm == torch.arange(n), perm.roll(1), perm)
            self.source_rows = perm
        self.source: dict[Site, torch.Tensor] = {}
        for site in self.sites:
            tgt = _canonical(site, target.cache[site])
            if ablation == "zero":
                self.source[site] = torch.zeros_like(tgt[:1])
            elif ablation == "mean":
                self.source[site] = tgt.mean(dim=0, keepdim=True)
            elif ablation == "resample":
                self.source[site] = tgt
            else:
                self.source[site] = _canonical(site, source.cache[site])
        if ablation in ("zero", "mean"):
            self.source_rows = torch.zeros(n, dtype=torch.long)

    def normalize(self, value: float) -> float:
        span = self.baselines["clean"] - self.baselines["corrupted"]
        return (value - self.baselines["corrupted"]) / span if span != 0 else math.nan


def _row(sweep: Sweep, method: str, patch: Patch, value: float, setup: _Setup) -> dict:
    return {
        "sweep": sweep.name,
        "method": method,
        "layer": patch.layer,
        "position": patch.position,
        "head": patch.head,
        "value": value,
        "normalized": setup.normalize(value),
    }


def _prefix_position(sweep: Sweep, patch: Patch) -> int:
    """Positions before a patch are unchanged (causal attention): a pass may start there."""
    if patch.position is None or sweep.kind.key_indexed:
        return 0
    return patch.position


def _patch_axes(sweep: Sweep, patches: Sequence[Patch], repeat: int = 1) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-row positions and heads of ``patches`` (None for an axis the sweep does not patch by),
    each patch repeated ``repeat`` times in a row (once per prompt)."""
    positions = torch.tensor([p.position for p in patches]).repeat_interleave(repeat) if "position" in sweep.by else None
    heads = torch.tensor([p.head for p in patches]).repeat_interleave(repeat) if "head" in sweep.by else None
    return positions, heads


def _source_values(site: Site, source: torch.Tensor, rows: torch.Tensor, positions, heads) -> torch.Tensor:
    probe = Intervention(site, "set", value=0.0, rows=rows, positions=positions, heads=heads, paired=True)
    return source[probe.index(source, torch.full((source.shape[0],), source.shape[1]))]


def _exact(setup: _Setup, result: PatchingResult, batch_rows: int, progress: bool) -> list[dict]:
    model, pairs = setup.model, setup.pairs
    n = pairs.size
    jobs = []  # (prefix position, layer, sweep index, patch)
    for index, sweep in enumerate(setup.sweeps):
        for p in sweep.patches(model.n_layers, setup.target_batch.seq_len, model.n_heads):
            jobs.append((_prefix_position(sweep, p) if setup.target_kv else 0, p.layer, index, p))
    # a block of prefix positions shares a batch that starts at the block's lowest position; inside
    # it rows are ordered by layer and join the batch at their own layer (run_stage's joins)
    pb = POSITION_BLOCK
    jobs.sort(key=lambda job: (job[0] // pb, job[1], job[0], job[2]))
    unchanged = _unchanged(setup, jobs)
    totals = (unchanged.double() * setup.target_per_prompt[None, :]).sum(1)
    rows = [(j, prompt) for j in range(len(jobs)) for prompt in range(n) if not unchanged[j, prompt]]
    result.rows_run += len(rows)
    result.rows_unchanged += int(unchanged.sum())
    bar = _progress(len(rows), progress, "exact patching")

    chunks = list(_batches(rows, jobs, batch_rows, pb if setup.can_skip else None))
    values: dict[int, torch.Tensor] = {}

    def record(index: int, logits: torch.Tensor, inputs: MetricInputs) -> None:
        values[index] = setup.metric(logits, inputs.select(_chunk_prompts(chunks[index]))).double().cpu()
        bar.update(len(chunks[index]))

    if setup.can_skip:
        # every batch starts mid-model; a pipeline backend streams them through its stages together
        requests = ((i, _stage_request(setup, jobs, chunk)) for i, chunk in enumerate(chunks))
        model.run_stages(requests, lambda i, logits: record(i, logits, setup.vocab_inputs))
    else:
        for i, chunk in enumerate(chunks):
            batch, interventions, _ = _chunk_patches(setup, jobs, chunk)
            patched = model.run(batch, interventions=[*setup.background, *interventions], logits="last")
            record(i, run_logits(patched), setup.inputs)
    bar.close()
    for i, chunk in enumerate(chunks):  # summed in chunk order whatever order they finished in
        totals.index_add_(0, torch.tensor([j for j, _ in chunk]), values[i])
    return [_row(setup.sweeps[i], "exact", p, float(totals[k] / n), setup) for k, (_, _, i, p) in enumerate(jobs)]


def _chunk_prompts(chunk) -> torch.Tensor:
    """``Long[rows]``: the prompt each row of a batch patches."""
    return torch.tensor([p for _, p in chunk])


def _chunk_patches(setup: _Setup, jobs, chunk) -> tuple[TokenBatch, list[Intervention], int]:
    """A batch's rows (the target prompts), one paired intervention per (sweep, layer) group, and the
    position the batch starts at (patch positions count from there)."""
    prompts = _chunk_prompts(chunk)
    batch = setup.target_batch.select(prompts)
    offset = min(jobs[j][0] for j, _ in chunk)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (j, _) in enumerate(chunk):
        groups[(jobs[j][2], jobs[j][1])].append(i)
    interventions = []
    for (sweep_index, layer), members in groups.items():
        sweep = setup.sweeps[sweep_index]
        site = sweep.site(layer)
        members_t = torch.tensor(members)
        positions, heads = _patch_axes(sweep, [jobs[chunk[i][0]][3] for i in members])
        value = _source_values(site, setup.source[site], setup.source_rows[prompts[members_t]], positions, heads)
        interventions.append(
            Intervention(
                site,
                "set",
                value=value,
                rows=members_t,
                heads=heads,
                paired=True,
                positions=positions - offset if positions is not None else None,
            )
        )
    return batch, interventions, offset


def _stage_request(setup: _Setup, jobs, chunk) -> StageRequest:
    """The mid-model pass of a batch whose rows join at their patched layer, with the target
    run's keys/values for the positions before the batch's first patched position."""
    batch, interventions, offset = _chunk_patches(setup, jobs, chunk)
    prompts = _chunk_prompts(chunk)
    layers = torch.tensor([jobs[j][1] for j, _ in chunk])
    first = int(layers[0])
    joins = {}
    every = torch.arange(setup.pairs.size)
    for layer in torch.unique_consecutive(layers).tolist():
        members = prompts[layers == layer]
        resid = setup.target_cache[Site(SiteKind.RESID_PRE, layer)][:, offset:]
        # every prompt in order: a view of the cached run (the service sends its memory once per call)
        joins[layer] = resid if torch.equal(members, every) else resid[members]
    prefix = None
    if offset > 0:
        if setup.target_kv is None:  # batches start past position 0 only when the target run kept its keys/values
            raise RuntimeError(f"a patching batch starts at position {offset} but the target run kept no keys/values")
        # one copy of each prompt's prefix, shared by its rows
        prefix = KVPrefix(
            offset,
            {layer: (k[:, :, :offset], v[:, :, :offset]) for layer, (k, v) in setup.target_kv.items() if layer >= first},
            rows=prompts,
        )
    return StageRequest(
        batch,
        first,
        setup.model.n_layers,
        with_head=True,
        joins=joins,
        interventions=interventions,
        logits="last",
        prefix=prefix,
        vocab=setup.vocab,
    )


def _unchanged(setup: _Setup, jobs) -> torch.Tensor:
    """``Bool[jobs, prompts]``: the patch would write exactly the value already there (e.g. a position
    before the first token where clean and corrupted prompts differ). Such a patched run *is* the
    target run, so its metric is the target's and no forward pass is needed."""
    n = setup.pairs.size
    out = torch.zeros(len(jobs), n, dtype=torch.bool)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, (_, layer, index, _) in enumerate(jobs):
        groups[(index, layer)].append(k)
    for (index, layer), members in groups.items():
        sweep = setup.sweeps[index]
        site = sweep.site(layer)
        patches = [jobs[k][3] for k in members]
        prompts = torch.arange(n).repeat(len(members))
        positions, heads = _patch_axes(sweep, patches, repeat=n)
        source = _source_values(site, setup.source[site], setup.source_rows[prompts], positions, heads)
        target = _source_values(site, _canonical(site, setup.target_cache[site]), prompts, positions, heads)
        out[torch.tensor(members)] = (source == target).flatten(1).all(1).view(len(members), n)
    return out


def _batches(rows, jobs, batch_rows: int, position_block: int | None):
    """Consecutive slices of ``rows`` of at most ``batch_rows``. With a ``position_block`` a slice
    stays inside one block of prefix positions, so it can reuse the keys/values before the block."""
    start = 0
    while start < len(rows):
        stop = min(start + batch_rows, len(rows))
        if position_block is not None:
            first = jobs[rows[start][0]][0] // position_block
            stop = next((i for i in range(start, stop) if jobs[rows[i][0]][0] // position_block != first), stop)
        yield rows[start:stop]
        start = stop


def _atp(setup: _Setup) -> list[dict]:
    model = setup.model
    inputs = setup.inputs

    def total_metric(logits, batch):
        return setup.metric(logits, inputs).sum()

    grads = model.gradients(setup.target_batch, total_metric, setup.sites, interventions=setup.background, logits="last").grads
    rows = []
    for sweep in setup.sweeps:
        for layer in range(model.n_layers):
            site = sweep.site(layer)
            target = _canonical(site, setup.target_cache[site]).double()
            source = setup.source[site].double()[setup.source_rows]
            effect = ((source - target) * _canonical(site, grads[site]).double()).sum(-1)  # [n, s(, h)]
            if "head" not in sweep.by and effect.ndim == 3:
                effect = effect.sum(2)
            if "position" not in sweep.by:
                effect = effect.sum(1, keepdim=True)
            estimate = (setup.target_per_prompt.view(-1, *[1] * (effect.ndim - 1)) + effect).mean(0)
            for p in sweep.patches(1, estimate.shape[0], model.n_heads):
                index = (p.position or 0,) + ((p.head,) if p.head is not None else ())
                patch = Patch(layer, p.position, p.head)
                rows.append(_row(sweep, "atp", patch, float(estimate[index]), setup))
    return rows


def layer_work(n_layers: int, method: str) -> LayerWork | None:
    """Relative compute of :func:`activation_patching` on a pipeline, for balancing its stages.
    Exact patching starts each row at its patched layer and every sweep patches each layer equally
    often, so layer ``l`` runs the rows of layers ``0..l``: work ``l + 1`` (the head unembeds one
    position and, for ``logit_diff``, two columns: nothing). With an even split the last of two
    stages would do ~3x the first's work; balanced, the first stage takes ~70 % of the layers. AtP
    alone runs whole passes (no per-layer skew): None."""
    if method == "atp":
        return None
    return LayerWork(tuple(float(layer + 1) for layer in range(n_layers)))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="row", leave=False)


def activation_patching(
    model: Backend,
    pairs: PairSet,
    sweeps: Sequence[Sweep],
    *,
    direction: Direction = "denoise",
    metric: str = "logit_diff",
    method: Method = "exact",
    ablation: Ablation | None = None,
    batch_rows: int | None = None,
    memory_mb: int = 1024,
    seed: int = 0,
    progress: bool = False,
    background: Sequence[Intervention] = (),
) -> PatchingResult:
    """Run ``sweeps`` over ``pairs`` on ``model`` (any :class:`~interplab.engine.backend.Backend`),
    with ``background`` interventions in every forward pass (see the module docstring)."""
    if method not in ("exact", "atp", "both"):
        raise SweepError(f"method must be exact, atp or both, got {method!r}")
    if batch_rows is not None and batch_rows < 1:
        raise SweepError(f"batch_rows must be a positive integer, got {batch_rows}")
    for sweep in sweeps:
        if sweep.kind == SiteKind.RESID_MID:
            model.validate_site(sweep.site(0))
    # mid-model starts need the target run's resid_pre (and keys/values); a background rules them
    # out, and without sweeps (the baselines alone) nothing starts mid-model
    need_resid = method != "atp" and not background and bool(sweeps)
    setup = _Setup(model, pairs, sweeps, direction, metric, ablation, seed, need_resid=need_resid, background=background)
    rows = batch_rows or default_batch_rows(model, setup.target_batch.seq_len, memory_mb)
    result = PatchingResult(baselines=dict(setup.baselines))
    tok = model.tokenizer
    result.tokens = [tok.decode([int(t)]) for t in setup.target_batch.input_ids[0, : int(setup.target_batch.lengths[0])]]
    if method in ("exact", "both"):
        result.rows += _exact(setup, result, rows, progress)
    if method in ("atp", "both"):
        result.rows += _atp(setup)
    if method == "both":
        for sweep in sweeps:
            result.correlation[sweep.name] = pearson(result.values(sweep.name, "exact"), result.values(sweep.name, "atp"))
    return result
