# Owner(s): ["oncall: distributed"]
"""What stands in for the series' C++ refusal here: the overlay's shim."""

from __future__ import annotations

import subprocess
import sys

import torch.distributed as dist


_GUARDS_WHILE_NEEDED = """
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
# What the shim keeps as torch's own is torch's own (the benchmark puts them back).
kept = {(cls, name): original for cls, name, original, _ in shim._guards}
assert kept == originals, "the shim keeps other originals"

def in_thread(fn):
    errors = []
    def run():
        try:
            fn()
        except BaseException as error:
            errors.append(error)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    if errors:
        raise errors[0]

def refused():
    try:
        dist.all_reduce(t)
    except RuntimeError as error:
        return "refuses collectives called directly" in str(error)
    return False

class Refusing:
    # Another thread that refuses until closed.
    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()
        assert self.entered.wait(timeout=60)
    def run(self):
        own._set_refuse_direct_collectives(True)
        self.entered.set()
        self.release.wait(timeout=60)
        own._set_refuse_direct_collectives(False)
    def close(self):
        self.release.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
t = torch.ones(1)
other = Refusing()
assert guarded() == set(originals), "not every method guarded"
own._set_refuse_direct_collectives(True)
own._set_refuse_direct_collectives(True)  # again: no second count
assert shim._refusing == 2, shim._refusing
assert refused(), "a refusing thread's call went through"
own._set_refuse_direct_collectives(False)
in_thread(lambda: dist.all_reduce(t))  # another thread refuses: nothing put back
assert guarded() == set(originals), "put back while a thread refuses"
other.close()
assert shim._refusing == 0, shim._refusing
# No thread refuses. A thread that refused (a worker issuing its own call)
# passes the guard and leaves it: setting its flag again replaces nothing.
dist.all_reduce(t)
assert guarded() == set(originals), "put back by a thread that refused"
# A thread that never refused (the caller, after parallel_map) puts torch's back.
in_thread(lambda: dist.all_reduce(t))
assert guarded() == set(), "not put back"
own._set_refuse_direct_collectives(True)  # guarded again
assert guarded() == set(originals)
assert refused(), "a refusing thread's call went through after the put-back"
own._set_refuse_direct_collectives(False)

# A Ctrl-C halfway through a put-back: the next refusal guards every method.
ORIGINAL = object()

class Trap(type):
    def __setattr__(cls, name, value):
        if value is ORIGINAL:
            raise KeyboardInterrupt
        super().__setattr__(name, value)

trap = (Trap("Trapped", (), {}), "method", ORIGINAL, lambda: None)
shim._guards.insert(len(shim._guards) // 2, trap)
try:
    in_thread(lambda: dist.all_reduce(t))
except KeyboardInterrupt:
    pass
else:
    raise AssertionError("the put-back was not interrupted")
shim._guards.remove(trap)
assert set() < guarded() < set(originals), "not a half-done put-back"
own._set_refuse_direct_collectives(True)
assert guarded() == set(originals), "a half-done put-back left methods unguarded"
assert refused(), "a refusing thread's call went through after a half-done put-back"
own._set_refuse_direct_collectives(False)
dist.destroy_process_group()
print("ok")
"""


def test_the_shim_guards_the_methods_while_a_thread_may_refuse():
    # The shim replaces each collective method by a guarded one when a thread
    # refuses, and puts torch's back only when a thread that never refused
    # calls one with no thread refusing (see the shim's docstring); a method
    # it missed would let a worker's direct call through on the overlay only.
    # In a fresh process: nothing has refused yet.
    run = subprocess.run(
        [sys.executable, "-c", _GUARDS_WHILE_NEEDED],
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
