"""The wire format: one body per request and per answer, ``[header][JSON][safetensors]``.

    magic  b"IPL1"            4 bytes
    n      uint32, little-endian: the JSON's length in bytes
    JSON   n bytes of UTF-8: an object describing the call (or the answer)
    rest   a safetensors file holding every tensor the JSON refers to (absent: no tensors)

A tensor inside the JSON is ``{"$tensor": "t3"}``, the name of an entry of the safetensors part. A
tensor whose rows repeat (a gather of a few rows: a patching sweep's per-row prefixes) is sent as its
distinct rows ``t3`` plus ``t3@rows`` (``Long[r]``: which distinct row each row is); the reader makes
it whole again, counting the whole tensor against the byte limit. A view of a small tensor's memory
(the same tensor sliced many ways: one prompt's cached activations from each stage pass's first
position) is sent as ``t5@view`` (``Long[2 + 2k]``: the number of the entry holding that memory, the
element offset, the ``k`` sizes and the ``k`` strides), the memory itself once per frame; the reader
copies each view out, after checking that it stays inside that entry.
Content type ``application/vnd.interplab.frame``. Errors are plain JSON (``errors.error_body``).
Nothing here unpickles: JSON and safetensors only, both parsed with size limits first.

:class:`Reader` reads typed fields out of a request's JSON and raises a :class:`FieldError` naming
the field's path (``interventions[2].value``) for anything missing, extra, of the wrong type, shape or
dtype, or holding NaN.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from interplab.serve.errors import FieldError, LimitError

MAGIC = b"IPL1"
CONTENT_TYPE = "application/vnd.interplab.frame"
TENSOR = "$tensor"
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int64, torch.int32)
_MISSING = object()
ROWS = "@rows"  # suffix of the index of a tensor sent as its distinct rows (see repeated_rows)
VIEW = "@view"  # suffix of the geometry of a tensor sent as a view of another entry's memory
REPEAT_MIN_ELEMENTS = 1 << 14  # smaller tensors are sent as they are
VIEW_MEMORY_MAX = 16 << 20  # a view's whole memory is sent (once) only up to this many bytes ...
VIEW_MEMORY_RATIO = 4  # ... and, the first time, only up to this many times the view's own bytes
VIEW_MAX_DIMS = 8


# --------------------------------------------------------------------------- frames
class Frame:
    """Collects tensors while an answer or request is built: ``frame.ref(t)`` goes in the JSON.
    ``find_repeats`` looks for repeated rows (:func:`repeated_rows`): requests do (a sweep's passes
    gather each prompt's rows many times); answers (logits, captures) seldom repeat and skip it."""

    def __init__(self, *, find_repeats: bool = True) -> None:
        self.find_repeats = find_repeats
        self.tensors: dict[str, torch.Tensor] = {}
        self.nbytes = 0  # the bytes sent
        self._whole: dict[str, int] = {}  # each reference's bytes once a reader has made it whole
        self._seen: dict[tuple[Any, ...], tuple[str, torch.Tensor]] = {}
        self._memory: dict[tuple[Any, ...], tuple[str, torch.Tensor]] = {}  # memory sent whole: its entry

    @property
    def whole_nbytes(self) -> int:
        """The tensors' bytes once read (repeated rows made whole): what a reader's limit counts."""
        return sum(self._whole.values())

    def ref(self, tensor: torch.Tensor) -> dict[str, str]:
        """A reference to ``tensor`` in this frame. The same tensor (the same memory, shape and
        strides: e.g. one KV prefix shared by many stage passes) is sent once and referred to again."""
        key = (tensor.device, tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.storage_offset())
        seen = self._seen.get(key)
        if seen is not None and tensor.numel():
            return {TENSOR: seen[0]}
        value = tensor.detach().to("cpu")
        memory_key = _memory_key(value)
        memory = self._memory_entry(value, memory_key)
        name = f"t{len(self.tensors)}"
        if memory is not None:  # a view of memory sent whole: where it lies in that memory
            geometry = [int(memory[1:]), value.storage_offset(), *value.shape, *value.stride()]
            self.tensors[name + VIEW] = torch.tensor(geometry, dtype=torch.long)
            self.nbytes += self.tensors[name + VIEW].nbytes
        else:
            # a copy of its own (safetensors refuses tensors that share memory, e.g. views of one capture)
            shared = repeated_rows(value) if self.find_repeats else None
            if shared is None:
                self.tensors[name] = value.clone(memory_format=torch.contiguous_format)
                if value.is_contiguous() and value.storage_offset() == 0 and value.nbytes == _memory_bytes(value):
                    self._memory[memory_key] = (name, value)  # its views can refer to it
            else:  # rows that repeat (a gather of a few rows): the distinct rows once, and which row is which
                self.tensors[name], self.tensors[name + ROWS] = shared
                self.nbytes += shared[1].nbytes
            self.nbytes += self.tensors[name].nbytes
        self._whole[name] = value.nbytes
        self._seen[key] = (name, tensor)  # the original is kept: its memory cannot be reused meanwhile
        return {TENSOR: name}

    def _memory_entry(self, value: torch.Tensor, key: tuple[Any, ...]) -> str | None:
        """The entry holding ``value``'s whole memory, when ``value`` is better sent as a view of it:
        memory already in the frame, or small memory (see ``VIEW_MEMORY_*``) that it only partly covers,
        which is then added (flat, once). None: send ``value``'s own elements."""
        if value.device.type != "cpu" or value.dtype not in FLOATS + INTS or not value.numel() or value.ndim > VIEW_MAX_DIMS:
            return None
        known = self._memory.get(key)
        if known is not None:
            return known[0]
        whole = _memory_bytes(value)
        if whole == value.nbytes or whole > VIEW_MEMORY_MAX or whole > VIEW_MEMORY_RATIO * value.nbytes:
            return None
        flat = value.as_strided((whole // value.element_size(),), (1,), 0)
        name = f"t{len(self.tensors)}"
        self.tensors[name] = flat.clone()
        self.nbytes += flat.nbytes
        self._whole[name] = flat.nbytes
        self._memory[key] = (name, flat)
        return name

    def forget_after(self, count: int) -> None:
        """Drop every tensor added after the first ``count`` (a part that did not fit is left out)."""
        for name in list(self.tensors)[count:]:
            self.nbytes -= self.tensors.pop(name).nbytes
            self._whole.pop(name.removesuffix(VIEW), None)
        self._seen = {k: v for k, v in self._seen.items() if v[0] in self.tensors or v[0] + VIEW in self.tensors}
        self._memory = {k: v for k, v in self._memory.items() if v[0] in self.tensors}

    def maybe(self, tensor: torch.Tensor | None) -> dict[str, str] | None:
        return None if tensor is None else self.ref(tensor)

    def encode(self, header: Mapping[str, Any]) -> bytes:
        return encode_frame(header, self.tensors)


def repeated_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(distinct, index)`` with ``distinct[index]`` equal to ``tensor`` bit for bit, when its rows
    (axis 0) repeat enough to halve its bytes; else None. Rows are grouped by a hash of their bytes
    and every row is compared with its group's first before the result is trusted."""
    rows = tensor.shape[0] if tensor.ndim >= 2 else 0
    if rows < 4 or tensor.numel() < REPEAT_MIN_ELEMENTS or tensor.dtype not in FLOATS + INTS:
        return None
    raw = tensor.reshape(rows, -1).contiguous().view(torch.uint8)  # each row's bytes
    words = raw[:, : raw.shape[1] // 8 * 8].view(torch.int64) if raw.shape[1] >= 8 else raw.long()
    weights = torch.randint(-(1 << 20), 1 << 20, (words.shape[1],), generator=torch.Generator().manual_seed(0))
    keys = (words * weights).sum(1)  # int64 arithmetic wraps: a hash, checked below
    _, index = torch.unique(keys, return_inverse=True)
    distinct = int(index.max()) + 1
    if distinct * 2 > rows:
        return None
    first = torch.full((distinct,), rows, dtype=torch.long).scatter_reduce(0, index, torch.arange(rows), reduce="amin")
    if not torch.equal(raw, raw[first][index]):  # a hash collision: send it as it is
        return None
    return tensor[first].clone(memory_format=torch.contiguous_format), index


def _memory_key(value: torch.Tensor) -> tuple[Any, ...]:
    storage = value.untyped_storage()
    return (storage.data_ptr(), storage.nbytes(), value.dtype)


def _memory_bytes(value: torch.Tensor) -> int:
    """The bytes of ``value``'s memory as whole elements of its dtype."""
    return value.untyped_storage().nbytes() // value.element_size() * value.element_size()


def encode_frame(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    data = save(dict(tensors)) if tensors else b""
    return MAGIC + struct.pack("<I", len(text)) + text + data


def decode_frame(
    body: bytes, *, max_json_bytes: int, max_tensor_bytes: int, whole: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON object and the tensors of a frame; FieldError/LimitError for anything malformed.
    ``whole=False`` leaves tensors sent as distinct rows or views so (see :func:`make_whole`)."""
    from safetensors.torch import load

    if len(body) < 8 or body[:4] != MAGIC:
        raise FieldError("body", f"not an interplab frame (expected the magic {MAGIC!r}, a uint32 length, JSON, safetensors)")
    (n,) = struct.unpack("<I", body[4:8])
    if n > max_json_bytes:
        raise LimitError("max_json_bytes", max_json_bytes, n, "the request's JSON length")
    if 8 + n > len(body):
        raise FieldError("body", f"the frame says its JSON is {n} bytes but only {len(body) - 8} follow")
    try:
        header = json.loads(body[8 : 8 + n].decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FieldError("body", f"the JSON part does not parse: {exc}") from None
    if not isinstance(header, dict):
        raise FieldError("body", f"the JSON part must be an object, got {type(header).__name__}")
    rest = body[8 + n :]
    if len(rest) > max_tensor_bytes:
        raise LimitError("max_tensor_bytes", max_tensor_bytes, len(rest), "the request's tensor bytes")
    tensors: dict[str, torch.Tensor] = {}
    if rest:
        try:
            tensors = dict(load(rest))
        except Exception as exc:  # noqa: BLE001 - safetensors reports malformed files with its own errors
            raise FieldError("tensors", f"the safetensors part does not parse: {exc}") from None
    return header, make_whole(tensors, max_tensor_bytes) if whole else tensors


def make_whole(tensors: dict[str, torch.Tensor], max_tensor_bytes: int) -> dict[str, torch.Tensor]:
    """Tensors sent as distinct rows plus an index (``NAME`` and ``NAME@rows``) or as views of another
    entry (``NAME@view``) made whole again, after checking indices and geometry, and that the whole
    tensors stay within ``max_tensor_bytes``."""
    shared = [name[: -len(ROWS)] for name in tensors if name.endswith(ROWS)]
    views = [name[: -len(VIEW)] for name in tensors if name.endswith(VIEW)]
    if not shared and not views:
        return tensors
    plain = {name: t for name, t in tensors.items() if not name.endswith((ROWS, VIEW))}
    total = sum(t.nbytes for name, t in plain.items() if name not in shared)
    for name in shared:
        index, base = tensors[name + ROWS], tensors.get(name)
        if base is None or base.ndim < 1 or index.dtype != torch.int64 or index.ndim != 1:
            raise FieldError("tensors", f"{name + ROWS} must be a 1-d int64 index into a tensor {name!r} of the frame")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= base.shape[0]):
            raise FieldError("tensors", f"{name + ROWS} indexes rows outside {name!r}'s {base.shape[0]}")
        total += len(index) * (base.nbytes // max(base.shape[0], 1))
    geometry = {name: _view_geometry(name, tensors, plain, shared) for name in views}
    total += sum(math.prod(shape) * plain[memory].element_size() for memory, _, shape, _ in geometry.values())
    if total > max_tensor_bytes:
        raise LimitError("max_tensor_bytes", max_tensor_bytes, total, "the request's tensor bytes")
    out = dict(plain)
    for name in shared:
        out[name] = out[name][tensors[name + ROWS]]
    for name, (memory, offset, shape, stride) in geometry.items():
        flat = plain[memory].reshape(-1)
        out[name] = flat.as_strided(shape, stride, flat.storage_offset() + offset).clone()
    return out


def _view_geometry(
    name: str, tensors: Mapping[str, torch.Tensor], plain: Mapping[str, torch.Tensor], shared: Sequence[str]
) -> tuple[str, int, list[int], list[int]]:
    """``(memory entry, offset, sizes, strides)`` of the view ``NAME@view``, checked to stay inside
    the entry it names (a plain entry: not itself a view or sent as distinct rows)."""
    field = name + VIEW
    g = tensors[field]
    if name in tensors or g.dtype != torch.int64 or g.ndim != 1 or len(g) < 2 or len(g) % 2 or len(g) > 2 + 2 * VIEW_MAX_DIMS:
        raise FieldError(
            "tensors",
            f"{field} must be int64 [entry, offset, {VIEW_MAX_DIMS} or fewer sizes, as many strides] of a view {name!r} not sent itself",
        )
    number, offset, *dims = g.tolist()
    memory = f"t{number}"
    if memory not in plain or memory in shared:
        raise FieldError("tensors", f"{field} refers to entry {memory!r}, which the frame does not hold as a plain tensor")
    k = len(dims) // 2
    shape, stride = dims[:k], dims[k:]
    if offset < 0 or any(d < 0 for d in dims):
        raise FieldError("tensors", f"{field} has a negative offset, size or stride: {g.tolist()}")
    if math.prod(shape) and offset + sum((n - 1) * st for n, st in zip(shape, stride)) >= plain[memory].numel():
        raise FieldError("tensors", f"{field} reaches past the {plain[memory].numel()} elements of {memory!r}")
    return memory, offset, shape, stride


def _no_constant(name: str) -> float:
    raise FieldError("body", f"JSON {name} is not allowed (send tensors for non-finite values)")


# --------------------------------------------------------------------------- reading fields
class Reader:
    """Typed, path-named access to one JSON object of a request (see the module docstring)."""

    def __init__(self, obj: object, path: str, tensors: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(obj, dict):
            raise FieldError(path or "body", f"must be an object, got {_kind(obj)}")
        self.obj = obj
        self.path = path
        self.tensors = tensors

    def field(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def only(self, allowed: Iterable[str]) -> Reader:
        """Refuse fields this object does not have (a misspelt option is an error, not ignored)."""
        allowed = set(allowed)
        extra = sorted(set(self.obj) - allowed)
        if extra:
            raise FieldError(self.field(extra[0]), f"unknown field; allowed here: {', '.join(sorted(allowed))}")
        return self

    def child(self, name: str, value: object | None = None) -> Reader:
        return Reader(self.obj.get(name) if value is None else value, self.field(name), self.tensors)

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        if name not in self.obj or self.obj[name] is None:
            if default is _MISSING:
                raise FieldError(self.field(name), "is required")
            return default
        return self.obj[name]

    def text(self, name: str, default: Any = _MISSING, choices: Sequence[str] | None = None) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise FieldError(self.field(name), f"must be a string, got {_kind(value)}")
        if choices is not None and value not in choices:
            raise FieldError(self.field(name), f"{value!r} is not one of {', '.join(choices)}")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise FieldError(self.field(name), f"must be true or false, got {_kind(value)}")
        return value

    def integer(self, name: str, default: Any = _MISSING, *, minimum: int | None = None) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            raise FieldError(self.field(name), f"must be an integer, got {_kind(value)}")
        if minimum is not None and value < minimum:
            raise FieldError(self.field(name), f"must be at least {minimum}, got {value}")
        return value

    def texts(self, name: str, default: Any = _MISSING) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise FieldError(self.field(name), f"must be a list of strings, got {_kind(value)}")
        return value

    def index(self, name: str) -> int | list[int] | torch.Tensor | None:
        """Rows, positions or heads: null, an integer, a list of integers or an integer tensor (1-d)."""
        value = self.raw(name, None)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise FieldError(self.field(name), "must be an integer or a list of integers")
            return value
        return self.tensor(name, dtypes=INTS, ndim=1)

    def tensor(
        self,
        name: str,
        *,
        dtypes: Sequence[torch.dtype],
        ndim: int | Sequence[int] | None = None,
        default: Any = _MISSING,
        finite: bool = True,
    ) -> Any:
        """A tensor reference, checked for dtype, rank and (floating tensors) NaN or infinite values."""
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        return tensor_of(value, self.field(name), self.tensors, dtypes=dtypes, ndim=ndim, finite=finite)

    def number_or_tensor(self, name: str) -> float | torch.Tensor:
        value = self.raw(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise FieldError(self.field(name), "must be finite")
            return float(value)
        return self.tensor(name, dtypes=FLOATS)


def tensor_of(
    value: object,
    field: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    dtypes: Sequence[torch.dtype],
    ndim: int | Sequence[int] | None = None,
    finite: bool = True,
) -> torch.Tensor:
    if not isinstance(value, dict) or set(value) != {TENSOR} or not isinstance(value[TENSOR], str):
        raise FieldError(field, f'must be a tensor reference {{"{TENSOR}": NAME}}, got {_kind(value)}')
    name = value[TENSOR]
    if name not in tensors:
        raise FieldError(field, f"refers to tensor {name!r}, which the request's safetensors part does not hold")
    tensor = tensors[name]
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise FieldError(field, f"has dtype {str(tensor.dtype).removeprefix('torch.')}; allowed: {allowed}")
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if ranks is not None and tensor.ndim not in ranks:
        raise FieldError(field, f"has shape {list(tensor.shape)}; expected {' or '.join(f'{r}-d' for r in ranks)}")
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise FieldError(field, "holds NaN or infinite values")
    return tensor


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def to_index_json(value: object, frame: Frame) -> object:
    """Rows/positions/heads for the wire: null, an int, a list of ints, or an integer tensor."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            raise TypeError(f"an index tensor must hold integers, got {value.dtype}")
        return frame.ref(value.reshape(-1).to(torch.int64))
    return [int(v) for v in value]  # type: ignore[attr-defined]
