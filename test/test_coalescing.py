# Owner(s): ["oncall: distributed"]
"""parallel_map(coalesce_all_reduces=True) in one process (gloo, world size 1).

World size 1 makes a sum the identity, so a result that comes back wrong,
or into the wrong tensor, shows; the process group's sequence number counts
the collectives that were really issued. Values across ranks, and that every
rank coalesces alike, are tested in test_parallel_map.py.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.threading import parallel_map


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.set_num_threads(1)
    yield
    dist.destroy_process_group()


def collectives_issued(fn, items, **kwargs):
    """``parallel_map``'s results, and how many collectives the group saw."""
    group = dist.distributed_c10d._get_default_group()
    before = group._get_sequence_number_for_group()
    results = parallel_map(fn, items, **kwargs)
    return results, group._get_sequence_number_for_group() - before


def test_small_all_reduces_share_a_collective_and_each_gets_its_own_result():
    shapes = [(3,), (2, 2), (1,), (5, 1), (4,), (2, 3)]

    def item(i):
        t = torch.arange(torch.Size(shapes[i]).numel(), dtype=torch.float32).view(shapes[i]) + i
        expected = t.clone()
        dist.all_reduce(t)
        return torch.equal(t, expected)

    results, issued = collectives_issued(item, range(6), max_workers=3,
                                         coalesce_all_reduces=True)
    assert results == [True] * 6
    assert issued < 6
    _, uncoalesced = collectives_issued(item, range(6), max_workers=3)
    assert uncoalesced == 6


def test_calls_that_differ_are_not_mixed():
    kinds = [
        (torch.float32, dist.ReduceOp.SUM),
        (torch.float64, dist.ReduceOp.SUM),
        (torch.int64, dist.ReduceOp.MAX),
        (torch.float32, dist.ReduceOp.MIN),
    ]

    def item(i):
        out = []
        for k in range(4):
            dtype, op = kinds[(i + k) % len(kinds)]
            t = torch.full((2,), i * 10 + k, dtype=dtype)
            dist.all_reduce(t, op=op)
            out.append((t.dtype, t.tolist()))
        return out

    results, issued = collectives_issued(item, range(8), max_workers=4,
                                         coalesce_all_reduces=True)
    assert results == [
        [(kinds[(i + k) % 4][0], [i * 10 + k] * 2) for k in range(4)] for i in range(8)
    ]
    # Item i's k-th call meets calls of the same kind from no other item in a
    # visit (the kinds rotate with i), so nothing can share a collective.
    assert issued == 32


def test_calls_that_cannot_be_coalesced_are_issued_alone():
    def item(i):
        big = torch.full((20_000,), float(i))  # over the size limit
        dist.all_reduce(big)
        small = torch.full((2,), float(i))
        dist.all_reduce(small, async_op=True).wait()  # the caller holds the Work
        strided = torch.full((4, 4), float(i)).t()  # not contiguous
        dist.all_reduce(strided)
        sparse = torch.sparse_coo_tensor([[0, 2]], [float(i), 1.0], (3,), check_invariants=True)
        dist.all_reduce(sparse)
        with torch.inference_mode():
            inference = torch.full((2,), float(i))
        dist.all_reduce(inference)
        return [big[0].item(), small[0].item(), strided[0, 0].item(),
                sparse.to_dense()[0].item(), inference[0].item()]

    results, issued = collectives_issued(item, range(4), max_workers=4,
                                         coalesce_all_reduces=True)
    assert results == [[float(i)] * 5 for i in range(4)]
    assert issued == 20


def test_a_failing_coalesced_call_raises_in_every_worker_it_served():
    def item(i):
        t = torch.ones(2, dtype=torch.complex64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # c10d refuses MAX on complex
        except ValueError as error:
            return error
        return None

    try:
        dist.all_reduce(torch.ones(2, dtype=torch.complex64), op=dist.ReduceOp.MAX)
    except ValueError as error:
        serial = str(error)
    errors, _ = collectives_issued(item, range(4), max_workers=4, coalesce_all_reduces=True)
    assert [str(error) for error in errors] == [serial] * 4
    # Each worker raises an exception of its own: a shared one would collect
    # every worker's traceback.
    assert len({id(error) for error in errors}) == 4


# c10d's in-place all_reduce on a tensor that requires grad warns; serially too.
@pytest.mark.filterwarnings("ignore:c10d")
def test_autograd_sees_what_it_sees_serially():
    def item(i):
        leaf = torch.full((2,), float(i), requires_grad=True)
        dist.all_reduce(leaf)
        (leaf * 2).sum().backward()
        weight = torch.ones(2, requires_grad=True)
        saved = torch.full((2,), float(i))
        loss = (weight * saved).sum()  # saves `saved` for backward
        dist.all_reduce(saved)
        try:
            loss.backward()
        except RuntimeError as error:  # modified by an in-place operation
            return leaf.grad.tolist(), saved._version, type(error).__name__
        return leaf.grad.tolist(), saved._version, weight.grad.tolist()

    serial = [item(i) for i in range(4)]
    results, _ = collectives_issued(item, range(4), max_workers=4, coalesce_all_reduces=True)
    assert results == serial


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
