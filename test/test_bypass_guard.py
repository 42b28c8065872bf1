# Owner(s): ["oncall: distributed"]
"""What stands in for the series' C++ refusal here: the overlay's shim."""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist


def test_the_shim_guards_the_methods_while_a_thread_refuses():
    # The shim guards each collective method while at least one thread
    # refuses, and puts torch's own back when the last one stops; a method
    # it missed would let a worker's direct call through on the overlay only.
    from torch import _direct_collective_refusal_shim as shim

    own = torch._C._distributed_c10d
    names = {
        cls: [name for name in shim.METHODS if name in cls.__dict__]
        for cls in (dist.ProcessGroup, own.Backend)
    }
    assert {"allreduce", "broadcast", "barrier", "send", "recv"} <= set(
        names[dist.ProcessGroup]
    )
    originals = {(cls, n): cls.__dict__[n] for cls in names for n in names[cls]}

    def guarded():
        return {key for key in originals if key[0].__dict__[key[1]] is not originals[key]}

    assert guarded() == set()
    entered, release = threading.Event(), threading.Event()

    def other_thread():
        own._set_refuse_direct_collectives(True)
        entered.set()
        release.wait(timeout=60)
        own._set_refuse_direct_collectives(False)

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert entered.wait(timeout=60)
        own._set_refuse_direct_collectives(True)
        own._set_refuse_direct_collectives(True)  # again: no second count
        assert guarded() == set(originals)
        own._set_refuse_direct_collectives(False)
        assert guarded() == set(originals)  # the other thread still refuses
    finally:
        own._set_refuse_direct_collectives(False)
        release.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert guarded() == set()


def test_ddp_cpp_collectives_are_never_replaced():
    # DDP's C++ collectives reach the schedule through the hooked functions
    # of torch.distributed.utils (a source edit), so nothing replaces them.
    import torch.distributed.threading

    own = torch._C._distributed_c10d
    for name in ("_broadcast_coalesced", "_verify_params_across_processes"):
        assert getattr(dist, name) is getattr(own, name), name
