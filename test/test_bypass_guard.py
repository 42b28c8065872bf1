# Owner(s): ["oncall: distributed"]
"""The refusal of direct process-group calls lasts as long as the outermost call."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.threading._bypass import RefuseProcessGroupCallsOnWorkers


def test_refusal_lasts_until_the_outermost_call_ends():
    original = dist.ProcessGroup.__dict__["allreduce"]
    with RefuseProcessGroupCallsOnWorkers():
        refusing = dist.ProcessGroup.__dict__["allreduce"]
        assert refusing is not original
        # The coordinating thread may start another call, from a coordinated function.
        with RefuseProcessGroupCallsOnWorkers():
            pass
        assert dist.ProcessGroup.__dict__["allreduce"] is refusing
    assert dist.ProcessGroup.__dict__["allreduce"] is original
