# Owner(s): ["oncall: distributed"]
"""The refusals of direct process-group calls last as long as the outermost call."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.threading._bypass import RefuseCollectivesOnWorkers


def test_refusal_lasts_until_the_outermost_call_ends():
    original = dist.ProcessGroup.__dict__["allreduce"]
    with RefuseCollectivesOnWorkers():
        refusing = dist.ProcessGroup.__dict__["allreduce"]
        assert refusing is not original
        # The coordinating thread may start another call, from a coordinated function.
        with RefuseCollectivesOnWorkers():
            pass
        assert dist.ProcessGroup.__dict__["allreduce"] is refusing
    assert dist.ProcessGroup.__dict__["allreduce"] is original


def test_ddp_cpp_collectives_are_never_replaced():
    # DDP's C++ collectives reach the schedule through the hooked functions
    # of torch.distributed.utils (a source edit), so nothing replaces them,
    # not even while a call runs.
    import torch.distributed.threading

    own = torch._C._distributed_c10d
    for name in ("_broadcast_coalesced", "_verify_params_across_processes"):
        assert getattr(dist, name) is getattr(own, name), name
        with RefuseCollectivesOnWorkers():
            assert getattr(dist, name) is getattr(own, name), name
