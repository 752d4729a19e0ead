"""The engine's values on the wire: prompts and token batches, interventions, positions, stage
requests, captures and results. ``encode_*`` run in the client (into a :class:`~interplab.serve.wire.Frame`),
``decode_*`` in the server (from a :class:`~interplab.serve.wire.Reader`, checking every field against
the model and naming it in errors); results go the other way.

JSON shapes (``T`` is a tensor reference ``{"$tensor": name}``)::

    prompts       {"texts": [str, ...]}  |  {"input_ids": T[b, s] int, "lengths": T[b] int, "texts": [str] | null}
    intervention  {"site": "z.3.1", "op": "set" | "add" | "scale", "value": number | T,
                   "rows": idx, "positions": idx, "heads": idx, "paired": bool}      idx: null | int | [int] | T
    positions     null | [int, ...] | T[b, p] int
    cache         {"sites": {"resid_pre.3": T, ...}, "positions": T, "valid": T}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from interplab.engine.backend import Backend
from interplab.engine.cache import ActivationCache
from interplab.engine.interventions import Intervention, InterventionError
from interplab.engine.plan import KVPrefix
from interplab.engine.results import Prompts, StageRequest
from interplab.engine.sites import Site, SiteError
from interplab.engine.tokens import TokenBatch
from interplab.serve.errors import FieldError
from interplab.serve.wire import FLOATS, INTS, Frame, Reader, tensor_of, to_index_json

OPS = ("set", "add", "scale")
LOGITS = ("all", "last", "none")
STAGE_LOGITS = ("all", "last")


# --------------------------------------------------------------------------- client: encode
def encode_prompts(prompts: Prompts, frame: Frame) -> dict[str, Any]:
    if isinstance(prompts, TokenBatch):
        expected = (torch.arange(prompts.seq_len)[None, :] < prompts.lengths.cpu()[:, None]).to(prompts.attention_mask.dtype)
        if not torch.equal(prompts.attention_mask.cpu(), expected):
            raise ValueError("a served model takes right-padded token batches (attention_mask = position < length)")
        return {
            "input_ids": frame.ref(prompts.input_ids.long()),
            "lengths": frame.ref(prompts.lengths.long()),
            "texts": list(prompts.texts) if prompts.texts is not None else None,
        }
    return {"texts": [prompts] if isinstance(prompts, str) else list(prompts)}


def encode_intervention(item: Intervention, frame: Frame) -> dict[str, Any]:
    if item.op not in OPS:
        raise TypeError(
            f"intervention on {item.site}: op {item.op!r} carries a Python callable, which a served model does not "
            "accept; compute the new values locally and send op 'set' (or use 'add'/'scale')"
        )
    value = item.value
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            value = value.to(torch.float32)
        wire_value: object = frame.ref(value)
    else:
        wire_value = float(value)  # type: ignore[arg-type]
    return {
        "site": str(item.site),
        "op": item.op,
        "value": wire_value,
        "rows": to_index_json(item.rows, frame),
        "positions": to_index_json(item.positions, frame),
        "heads": to_index_json(item.heads, frame),
        "paired": bool(item.paired),
    }


def encode_interventions(items: Sequence[Intervention], frame: Frame) -> list[dict[str, Any]]:
    return [encode_intervention(item, frame) for item in items]


def encode_positions(positions: object, frame: Frame) -> object:
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor):
        if positions.ndim == 2:
            return frame.ref(positions.to(torch.int64))
        return [int(p) for p in positions.reshape(-1).tolist()]
    return [int(p) for p in positions]  # type: ignore[attr-defined]


def encode_stage_request(key: int, request: StageRequest, frame: Frame) -> dict[str, Any]:
    if request.joins and any(not isinstance(t, torch.Tensor) for t in request.joins.values()):
        raise ValueError("run_stages over the service takes joins as resid_pre tensors; forks of rows run in the replica only")
    prefix = None
    if request.prefix is not None:
        prefix = {
            "length": request.prefix.length,
            "kv": {str(layer): [frame.ref(k), frame.ref(v)] for layer, (k, v) in request.prefix.kv.items()},
            "rows": frame.maybe(request.prefix.rows.long() if request.prefix.rows is not None else None),
        }
    return {
        "key": key,
        "batch": encode_prompts(request.batch, frame),
        "start": request.start,
        "stop": request.stop,
        "hidden": frame.maybe(request.hidden),
        "with_head": request.with_head,
        "interventions": encode_interventions(request.interventions, frame),
        "logits": request.logits,
        "prefix": prefix,
        "joins": {str(layer): frame.ref(t) for layer, t in (request.joins or {}).items() if isinstance(t, torch.Tensor)} or None,
        "vocab": frame.maybe(request.vocab.long() if request.vocab is not None else None),
    }


# --------------------------------------------------------------------------- server: decode
def decode_prompts(reader: Reader, model: Backend) -> TokenBatch:
    """A token batch: the service's tokenizer on texts, or ids checked against the vocabulary."""
    if "texts" in reader.obj and "input_ids" not in reader.obj:
        reader.only(["texts"])
        texts = reader.raw("texts")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise FieldError(reader.field("texts"), "must be a list of strings")
        return model.tokenize(texts)
    reader.only(["input_ids", "lengths", "texts"])
    ids = reader.tensor("input_ids", dtypes=INTS, ndim=2).long()
    lengths = reader.tensor("lengths", dtypes=INTS, ndim=1).long()
    b, s = ids.shape
    if b == 0 or s == 0:
        raise FieldError(reader.field("input_ids"), f"has shape {list(ids.shape)}; a batch needs at least one row and one token")
    if len(lengths) != b:
        raise FieldError(reader.field("lengths"), f"has {len(lengths)} entries for {b} rows of input_ids")
    if bool((lengths < 1).any()) or bool((lengths > s).any()):
        raise FieldError(
            reader.field("lengths"), f"every length must lie in [1, {s}] (the padded width), got {lengths.tolist()[:8]}"
        )
    if bool((ids < 0).any()) or bool((ids >= model.d_vocab).any()):
        raise FieldError(reader.field("input_ids"), f"token ids must lie in [0, {model.d_vocab}) (the model's vocabulary)")
    texts = reader.raw("texts", None)
    if texts is not None and (not isinstance(texts, list) or len(texts) != b or not all(isinstance(t, str) for t in texts)):
        raise FieldError(reader.field("texts"), f"must be null or {b} strings")
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    return TokenBatch(ids, mask, lengths, tuple(texts) if texts is not None else None)


def decode_site(value: object, field: str, model: Backend) -> Site:
    if not isinstance(value, str):
        raise FieldError(field, f"must be a site string like 'resid_pre.3', got {type(value).__name__}")
    try:
        return model.validate_site(value)
    except SiteError as exc:
        raise SiteError(f"{field}: {exc}") from None


def decode_sites(reader: Reader, name: str, model: Backend) -> list[Site]:
    values = reader.texts(name, [])
    return [decode_site(v, f"{reader.field(name)}[{i}]", model) for i, v in enumerate(values)]


def decode_intervention(reader: Reader, model: Backend) -> Intervention:
    reader.only(["site", "op", "value", "rows", "positions", "heads", "paired"])
    site = decode_site(reader.raw("site"), reader.field("site"), model)
    op = reader.text("op", choices=OPS)
    value = reader.number_or_tensor("value")
    try:
        return Intervention(
            site,
            op,
            value=value,
            rows=reader.index("rows"),
            positions=reader.index("positions"),
            heads=reader.index("heads"),
            paired=reader.flag("paired"),
        )
    except InterventionError as exc:
        raise InterventionError(f"{reader.path}: {exc}") from None


def decode_interventions(reader: Reader, name: str, model: Backend) -> list[Intervention]:
    items = reader.raw(name, [])
    if not isinstance(items, list):
        raise FieldError(reader.field(name), "must be a list of interventions")
    return [decode_intervention(reader.child(f"{name}[{i}]", item), model) for i, item in enumerate(items)]


def decode_positions(reader: Reader, name: str = "positions") -> list[int] | torch.Tensor | None:
    value = reader.raw(name, None)
    if value is None:
        return None
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise FieldError(reader.field(name), "must be null, a non-empty list of integers or a [rows, p] integer tensor")
        return value
    return reader.tensor(name, dtypes=INTS, ndim=2).long()


def decode_stage_request(reader: Reader, model: Backend) -> tuple[int, StageRequest]:
    reader.only(["key", "batch", "start", "stop", "hidden", "with_head", "interventions", "logits", "prefix", "joins", "vocab"])
    key = reader.integer("key", minimum=0)
    batch = decode_prompts(reader.child("batch"), model)
    start = reader.integer("start", minimum=0)
    stop = reader.integer("stop", minimum=1)
    if not start < stop <= model.n_layers:
        raise FieldError(reader.field("stop"), f"layers [{start}, {stop}) must satisfy 0 <= start < stop <= {model.n_layers}")
    hidden = reader.tensor("hidden", dtypes=FLOATS, ndim=3, default=None)
    joins = None
    if reader.raw("joins", None) is not None:
        raw = reader.raw("joins")
        if not isinstance(raw, dict):
            raise FieldError(reader.field("joins"), "must be an object {layer: tensor}")
        joins = {
            _layer(k, f"{reader.field('joins')}.{k}", model): tensor_of(
                v, f"{reader.field('joins')}.{k}", reader.tensors, dtypes=FLOATS, ndim=3
            )
            for k, v in raw.items()
        }
    for field, tensor in [("hidden", hidden), *((f"joins.{k}", t) for k, t in (joins or {}).items())]:
        if tensor is not None and (tensor.shape[1] > batch.seq_len or tensor.shape[2] != model.d_model):
            raise FieldError(
                reader.field(field), f"has shape {list(tensor.shape)}; expected [rows, <= {batch.seq_len}, {model.d_model}]"
            )
    prefix = decode_prefix(reader.child("prefix"), batch, model) if reader.raw("prefix", None) is not None else None
    vocab = reader.tensor("vocab", dtypes=INTS, ndim=1, default=None)
    return key, StageRequest(
        batch,
        start,
        stop,
        hidden=hidden,
        with_head=reader.flag("with_head"),
        interventions=tuple(decode_interventions(reader, "interventions", model)),
        logits=reader.text("logits", "all", choices=STAGE_LOGITS),
        prefix=prefix,
        joins=joins,
        vocab=vocab,
    )


def decode_prefix(reader: Reader, batch: TokenBatch, model: Backend) -> KVPrefix:
    """A stage request's :class:`~interplab.engine.plan.KVPrefix`: per layer ``[keys, values]`` of
    shape ``[n, n_kv_heads, length, head_dim]``, and ``rows`` (one entry per batch row, into the
    n) or, without it, at least one prefix row per batch row."""
    reader.only(["length", "kv", "rows"])
    length = reader.integer("length", minimum=0)
    raw_kv = reader.raw("kv")
    if not isinstance(raw_kv, dict):
        raise FieldError(reader.field("kv"), "must be an object {layer: [keys, values]}")
    rows = reader.tensor("rows", dtypes=INTS, ndim=1, default=None)
    if rows is not None and len(rows) != batch.size:
        raise FieldError(reader.field("rows"), f"has {len(rows)} entries for a batch of {batch.size} rows")
    kv = {}
    for k, pair in raw_kv.items():
        field = f"{reader.field('kv')}.{k}"
        if not isinstance(pair, list) or len(pair) != 2:
            raise FieldError(field, "must be [keys, values]")
        keys, values = (tensor_of(t, field, reader.tensors, dtypes=FLOATS, ndim=4) for t in pair)
        n = keys.shape[0]
        expected = [n, model.n_kv_heads, length, model.head_dim]
        if list(keys.shape) != expected or list(values.shape) != expected:
            raise FieldError(field, f"has shapes {list(keys.shape)} and {list(values.shape)}; expected {expected} each")
        if rows is None and n < batch.size:
            raise FieldError(field, f"holds {n} rows for a batch of {batch.size}; send one per row, or rows")
        if rows is not None and len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise FieldError(reader.field("rows"), f"indexes rows outside the {n} of {field}")
        kv[_layer(k, field, model)] = (keys, values)
    return KVPrefix(length, kv, rows.long() if rows is not None else None)


def _layer(text: str, field: str, model: Backend) -> int:
    if not text.isdigit() or int(text) >= model.n_layers:
        raise FieldError(field, f"{text!r} is not a layer of the model (0..{model.n_layers - 1})")
    return int(text)


# --------------------------------------------------------------------------- results (both sides)
def encode_cache(cache: ActivationCache, frame: Frame) -> dict[str, Any]:
    return {
        "sites": {str(site): frame.ref(value) for site, value in cache.items()},
        "positions": frame.ref(cache.positions),
        "valid": frame.ref(cache.valid),
    }


def decode_cache(obj: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> ActivationCache:
    values = {
        Site.parse(name): tensor_of(ref, f"cache.{name}", tensors, dtypes=FLOATS, finite=False)
        for name, ref in obj["sites"].items()
    }
    positions = tensor_of(obj["positions"], "cache.positions", tensors, dtypes=INTS)
    valid = tensor_of(obj["valid"], "cache.valid", tensors, dtypes=(torch.bool,))
    return ActivationCache(values, positions, valid)


def encode_batch(batch: TokenBatch, frame: Frame) -> dict[str, Any]:
    return {
        "input_ids": frame.ref(batch.input_ids),
        "lengths": frame.ref(batch.lengths),
        "texts": list(batch.texts) if batch.texts is not None else None,
    }


def decode_batch(obj: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> TokenBatch:
    ids = tensor_of(obj["input_ids"], "batch.input_ids", tensors, dtypes=INTS)
    lengths = tensor_of(obj["lengths"], "batch.lengths", tensors, dtypes=INTS)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    texts = obj.get("texts")
    return TokenBatch(ids, mask, lengths, tuple(texts) if texts is not None else None)


def answer_tensor(obj: object, field: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A tensor of an answer (any dtype the service sends; not-finite values are the model's own)."""
    return tensor_of(obj, field, tensors, dtypes=(*FLOATS, *INTS, torch.bool), finite=False)


def tensor_or_none(obj: object, field: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    return None if obj is None else answer_tensor(obj, field, tensors)
