"""The wire's frames: tensors whose rows repeat go as their distinct rows plus an index, and views of
one small tensor as its memory once plus their geometry; both come back bit for bit, and a reader
refuses indexes and geometry that do not fit and counts the whole tensors' bytes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from interplab.serve.errors import FieldError, LimitError
from interplab.serve.wire import MAGIC, ROWS, VIEW, Frame, decode_frame, repeated_rows

BIG = dict(max_json_bytes=1 << 20, max_tensor_bytes=1 << 30)


def gathered() -> tuple[torch.Tensor, torch.Tensor]:
    """A [480, 3, 7, 64] gather of 8 rows (a sweep's per-row key prefix), with a -0.0 in one row."""
    base = torch.randn(8, 3, 7, 64, generator=torch.Generator().manual_seed(0))
    base[3, 0, 0, 0] = -0.0
    index = torch.arange(8).repeat(60)
    return base[index], index


def test_repeated_rows_go_once_and_come_back_bit_for_bit():
    tensor, _ = gathered()
    frame = Frame()
    header = {"k": frame.ref(tensor), "small": frame.ref(torch.arange(6.0).reshape(3, 2))}
    assert set(frame.tensors) == {"t0", "t0" + ROWS, "t2"} and frame.tensors["t0"].shape[0] == 8
    body = frame.encode(header)
    assert len(body) < tensor.nbytes / 40  # 8 distinct rows of 480, and the index
    assert frame.nbytes == sum(t.nbytes for t in frame.tensors.values())
    assert frame.whole_nbytes == tensor.nbytes + 6 * 4  # what the reader's limit will count
    _, tensors = decode_frame(body, **BIG)
    assert set(tensors) == {"t0", "t2"}
    assert torch.equal(tensors["t0"].view(torch.int32), tensor.view(torch.int32))  # bit for bit (-0.0 too)


def test_an_answer_frame_does_not_look_for_repeats():
    tensor, _ = gathered()
    frame = Frame(find_repeats=False)
    header = {"k": frame.ref(tensor)}
    assert set(frame.tensors) == {"t0"} and frame.nbytes == tensor.nbytes
    _, tensors = decode_frame(frame.encode(header), **BIG)
    assert torch.equal(tensors["t0"], tensor)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(64, 512, generator=torch.Generator().manual_seed(1)),  # distinct rows
        torch.zeros(3, 8192),  # too few rows
        torch.zeros(64, 16),  # too small to bother
    ],
)
def test_tensors_without_enough_repeats_go_as_they_are(tensor):
    assert repeated_rows(tensor) is None
    frame = Frame()
    frame.ref(tensor)
    assert list(frame.tensors) == ["t0"]


def test_half_distinct_rows_are_not_worth_an_index():
    rows = torch.randn(40, 1024, generator=torch.Generator().manual_seed(2))
    assert repeated_rows(rows[torch.arange(40).repeat_interleave(2)]) is not None  # 40 distinct of 80
    assert repeated_rows(rows[torch.cat([torch.arange(40), torch.arange(39)])]) is None  # 40 distinct of 79


def test_forgetting_a_pass_drops_its_rows_and_index():
    frame = Frame()
    frame.ref(torch.ones(4, 4))
    before = len(frame.tensors)
    frame.ref(gathered()[0])
    frame.forget_after(before)
    assert list(frame.tensors) == ["t0"] and frame.nbytes == frame.whole_nbytes == frame.tensors["t0"].nbytes


def body_of(tensors: dict[str, torch.Tensor]) -> bytes:
    text = b"{}"
    return MAGIC + len(text).to_bytes(4, "little") + text + save(tensors)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"t0": torch.zeros(2, 4), "t0@rows": torch.tensor([0, 2])}, r"t0@rows indexes rows outside 't0''s 2"),
        ({"t0": torch.zeros(2, 4), "t0@rows": torch.tensor([-1, 0])}, r"t0@rows indexes rows outside"),
        ({"t0": torch.zeros(2, 4), "t0@rows": torch.tensor([0.0, 1.0])}, r"t0@rows must be a 1-d int64 index"),
        ({"t0": torch.zeros(2, 4), "t0@rows": torch.zeros(2, 2, dtype=torch.long)}, r"t0@rows must be a 1-d int64 index"),
        ({"t1@rows": torch.tensor([0, 1])}, r"t1@rows must be a 1-d int64 index into a tensor 't1'"),
    ],
)
def test_an_index_that_does_not_fit_is_refused(tensors, message):
    with pytest.raises(FieldError, match=message):
        decode_frame(body_of(tensors), **BIG)


def test_the_whole_tensor_counts_against_the_byte_limit():
    """Three floats and an index of 100,000 zeros would be 1.2 MB once made whole: over a 1 MB limit."""
    body = body_of({"t0": torch.zeros(1, 3), "t0@rows": torch.zeros(100_000, dtype=torch.long)})
    assert len(body) < 1 << 20
    with pytest.raises(LimitError, match="max_tensor_bytes") as info:
        decode_frame(body, max_json_bytes=1 << 20, max_tensor_bytes=1 << 20)
    assert info.value.limit == "max_tensor_bytes"


def cached_run() -> tuple[torch.Tensor, torch.Tensor]:
    """A run's cached resid_pre ``[8, 15, 64]`` and keys ``[8, 3, 15, 16]``, with a -0.0 in each."""
    gen = torch.Generator().manual_seed(3)
    resid, keys = torch.randn(8, 15, 64, generator=gen), torch.randn(8, 3, 15, 16, generator=gen)
    resid[2, 9, 5] = keys[1, 2, 3, 4] = -0.0
    return resid, keys


def test_views_of_one_tensor_go_as_its_memory_once_and_come_back_bit_for_bit():
    """Stage passes starting at positions 1..14 join at suffixes of a cached run and hold prefixes of
    its keys: each tensor's memory is sent once, each view as its geometry."""
    resid, keys = cached_run()
    frame = Frame()
    header = {"suffix": [frame.ref(resid[:, p:]) for p in range(1, 15)], "prefix": [frame.ref(keys[:, :, :p]) for p in range(4, 15)]}
    entries = [n for n in frame.tensors if not n.endswith(VIEW)]
    assert len(entries) == 2 and sum(n.endswith(VIEW) for n in frame.tensors) == 25
    assert frame.nbytes <= resid.nbytes + keys.nbytes + 25 * 80  # the two tensors and 25 geometries of <= 10 int64
    whole = sum(resid[:, p:].nbytes for p in range(1, 15)) + sum(keys[:, :, :p].nbytes for p in range(4, 15))
    assert frame.whole_nbytes == whole + resid.nbytes + keys.nbytes  # what the reader's limit will count
    header, tensors = decode_frame(frame.encode(header), **BIG)
    for p, ref in zip(range(1, 15), header["suffix"]):
        got = tensors[ref["$tensor"]]
        assert got.is_contiguous() and torch.equal(got.view(torch.int32), resid[:, p:].contiguous().view(torch.int32))
    for p, ref in zip(range(4, 15), header["prefix"]):
        assert torch.equal(tensors[ref["$tensor"]].view(torch.int32), keys[:, :, :p].contiguous().view(torch.int32))


def test_a_small_view_of_large_memory_goes_as_itself_until_that_memory_is_in_the_frame():
    resid, _ = cached_run()
    frame = Frame()
    first = frame.ref(resid[:, 14:])  # a fifteenth of the memory: its own copy
    assert list(frame.tensors) == [first["$tensor"]]
    whole = frame.ref(resid)  # the whole tensor: later views refer to it
    later = frame.ref(resid[:, 13:])
    assert later["$tensor"] + VIEW in frame.tensors and len(frame.tensors) == 3
    _, tensors = decode_frame(frame.encode({"a": first, "b": whole, "c": later}), **BIG)
    assert torch.equal(tensors[first["$tensor"]], resid[:, 14:]) and torch.equal(tensors[later["$tensor"]], resid[:, 13:])


def test_forgetting_a_pass_drops_the_memory_it_added():
    resid, _ = cached_run()
    frame = Frame()
    frame.ref(torch.ones(4, 4))
    frame.ref(resid[:, 2:])
    frame.forget_after(1)
    assert list(frame.tensors) == ["t0"] and frame.nbytes == frame.whole_nbytes == 64
    again = frame.ref(resid[:, 3:])  # the memory is added again, not referred to as forgotten
    _, tensors = decode_frame(frame.encode({"v": again}), **BIG)
    assert torch.equal(tensors[again["$tensor"]], resid[:, 3:])


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"t0": torch.zeros(10), "t1@view": torch.tensor([0, 0, 3, 4, 4, 1])}, r"t1@view reaches past the 10 elements of 't0'"),
        ({"t0": torch.zeros(10), "t1@view": torch.tensor([0, 8, 3, 1])}, r"t1@view reaches past"),
        ({"t0": torch.zeros(10), "t1@view": torch.tensor([0, -1, 2, 1])}, r"t1@view has a negative offset, size or stride"),
        ({"t0": torch.zeros(10), "t1@view": torch.tensor([0, 0, 2, -1])}, r"t1@view has a negative offset, size or stride"),
        ({"t0": torch.zeros(10), "t1@view": torch.tensor([5, 0, 2, 1])}, r"refers to entry 't5', which the frame does not hold"),
        ({"t0": torch.zeros(10), "t1@view": torch.tensor([0, 0, 2])}, r"t1@view must be int64 \[entry, offset"),
        ({"t0": torch.zeros(10), "t1@view": torch.tensor([0.0, 0.0, 2.0, 1.0])}, r"t1@view must be int64"),
        ({"t0": torch.zeros(10), "t1@view": torch.zeros(20, dtype=torch.long)}, r"t1@view must be int64"),
        ({"t0": torch.zeros(10), "t1": torch.zeros(2), "t1@view": torch.tensor([0, 0, 2, 1])}, r"not sent itself"),
        ({"t0": torch.zeros(2, 5), "t0@rows": torch.tensor([0, 1]), "t1@view": torch.tensor([0, 0, 2, 1])}, r"as a plain tensor"),
        ({"t0": torch.zeros(10), "t1@view": torch.tensor([0, 0, 2, 1]), "t2@view": torch.tensor([1, 0, 2, 1])}, r"as a plain tensor"),
    ],
)
def test_a_view_that_does_not_fit_is_refused(tensors, message):
    with pytest.raises(FieldError, match=message):
        decode_frame(body_of(tensors), **BIG)


def test_a_view_counts_its_whole_bytes_against_the_limit():
    """One float viewed 300,000 times (stride 0) would be 1.2 MB once copied out: over a 1 MB limit."""
    body = body_of({"t0": torch.zeros(1), "t1@view": torch.tensor([0, 0, 300_000, 0])})
    assert len(body) < 1 << 10
    with pytest.raises(LimitError, match="max_tensor_bytes"):
        decode_frame(body, max_json_bytes=1 << 20, max_tensor_bytes=1 << 20)
