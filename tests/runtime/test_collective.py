"""The replicas' gradient all-reduce (torch.distributed over Gloo, between real Ray actors)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


class Member:
    """A process holding parameters whose gradients take part in the all-reduce."""

    def __init__(self, grads: list[torch.Tensor | None], dtypes: list[torch.dtype]) -> None:
        self.params = []
        for grad, dtype in zip(grads, dtypes):
            param = torch.nn.Parameter(torch.zeros(3, 2, dtype=dtype))
            param.grad = None if grad is None else grad.to(dtype)
            self.params.append(param)

    def address(self) -> str:
        from interplab.runtime import collective

        return collective.free_address()

    def join(self, address: str, rank: int, world: int) -> int:
        from interplab.runtime import collective

        collective.join(address, rank, world, torch.device("cpu"))
        return rank

    def reduce(self, bucket_bytes: int) -> int:
        from interplab.runtime import collective

        return collective.all_reduce_grads(self.params, bucket_bytes=bucket_bytes)

    def grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.params]

    def leave(self) -> bool:
        from interplab.runtime import collective

        collective.leave()
        return collective.joined()


@pytest.mark.parametrize("bucket_bytes", [1 << 20, 8], ids=["one-bucket", "a-bucket-each"])
def test_gradients_are_summed_over_replicas_and_missing_ones_count_as_zero(ray_cluster, bucket_bytes):
    ray = ray_cluster
    ones = torch.ones(3, 2)
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32]
    grads = [
        [ones, None, 0.5 * ones, None],  # replica 0: no gradient for the second parameter
        [2 * ones, 3 * ones, 0.25 * ones, None],  # the fourth has none anywhere
    ]
    actor = ray.remote(num_cpus=0.1)(Member)
    members = [actor.remote(g, dtypes) for g in grads]
    address = ray.get(members[0].address.remote())
    assert ray.get([m.join.remote(address, rank, 2) for rank, m in enumerate(members)]) == [0, 1]
    assert ray.get([m.reduce.remote(bucket_bytes) for m in members]) == [3, 3]
    first, second = ray.get([m.grads.remote() for m in members])
    expected = [3 * ones, 3 * ones, 0.75 * ones.double(), None]
    for got in (first, second):
        for value, want in zip(got, expected):
            if want is None:
                assert value is None, "a parameter without a gradient anywhere keeps none (Adam skips it)"
            else:
                assert value.dtype == want.dtype
                torch.testing.assert_close(value, want, rtol=0, atol=0)
    assert ray.get([m.leave.remote() for m in members]) == [False, False]
    for m in members:
        ray.kill(m)
