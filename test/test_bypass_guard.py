# Owner(s): ["oncall: distributed"]
"""What stands in for the series' C++ refusal here: the overlay's shim."""

from __future__ import annotations

import subprocess
import sys

import torch.distributed as dist


_GUARDS_FROM_THE_FIRST_REFUSAL = """
import threading
import torch
import torch.distributed as dist
from torch import _direct_collective_refusal_shim as shim

own = torch._C._distributed_c10d
names = {
    cls: [name for name in shim.METHODS if name in cls.__dict__]
    for cls in (dist.ProcessGroup, own.Backend)
}
assert {"allreduce", "broadcast", "barrier", "send", "recv"} <= set(names[dist.ProcessGroup])
originals = {(cls, n): cls.__dict__[n] for cls in names for n in names[cls]}

def guarded():
    return {key for key in originals if key[0].__dict__[key[1]] is not originals[key]}

assert guarded() == set(), "guarded before any thread refused"
entered, release = threading.Event(), threading.Event()

def other_thread():
    own._set_refuse_direct_collectives(True)
    entered.set()
    release.wait(timeout=60)
    own._set_refuse_direct_collectives(False)

thread = threading.Thread(target=other_thread)
thread.start()
assert entered.wait(timeout=60)
assert guarded() == set(originals), "not every method guarded"
own._set_refuse_direct_collectives(True)
own._set_refuse_direct_collectives(True)  # again: no second count
assert shim._refusing == 2, shim._refusing
own._set_refuse_direct_collectives(False)
release.set()
thread.join(timeout=60)
assert not thread.is_alive()
assert shim._refusing == 0, shim._refusing
assert guarded() == set(originals), "the guards were taken off"
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
t = torch.ones(1)
dist.all_reduce(t)  # a thread that does not refuse passes the guard
assert t.item() == 1.0
own._set_refuse_direct_collectives(True)
try:
    dist.all_reduce(t)
except RuntimeError as error:
    assert "refuses collectives called directly" in str(error), error
else:
    raise AssertionError("a refusing thread's call went through")
own._set_refuse_direct_collectives(False)
dist.destroy_process_group()
print("ok")
"""


def test_the_shim_guards_the_methods_from_the_first_refusal_on():
    # The shim replaces each collective method by a guarded one when a thread
    # first refuses, and keeps it (setting the flag stays cheap, see the
    # shim's docstring); a method it missed would let a worker's direct call
    # through on the overlay only. In a fresh process: nothing has refused yet.
    run = subprocess.run(
        [sys.executable, "-c", _GUARDS_FROM_THE_FIRST_REFUSAL],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_ddp_cpp_collectives_are_never_replaced():
    # DDP's C++ collectives reach the schedule through the hooked functions
    # of torch.distributed.utils (a source edit), so nothing replaces them.
    import torch.distributed.threading

    own = torch._C._distributed_c10d
    for name in ("_broadcast_coalesced", "_verify_params_across_processes"):
        assert getattr(dist, name) is getattr(own, name), name
