# Owner(s): ["oncall: distributed"]

import copy
import threading

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch._ops import (
    _COLLECTIVE_OPS,
    _collective_op_hook,
    _CollectiveOpOverload,
    _CollectiveOpOverloadPacket,
    OpOverload,
    OpOverloadPacket,
)
from torch.testing._internal.common_distributed import requires_gloo
from torch.testing._internal.common_utils import run_tests, TestCase


class _Recorder:
    """An op hook that records each call and returns a marker."""

    def __init__(self):
        self.calls = []

    def __call__(self, op, args, kwargs):
        self.calls.append((op, args, kwargs))
        return "handed over"


class CollectiveOpHookTest(TestCase):
    def tearDown(self):
        _collective_op_hook.fn = None
        super().tearDown()

    def test_collective_ops_call_the_hook(self):
        recorder = _Recorder()
        _collective_op_hook.fn = recorder
        packet = torch.ops._c10d_functional.all_reduce
        x = torch.ones(2)
        self.assertEqual(packet.default(x, "sum", "g"), "handed over")
        self.assertEqual(packet(x, reduce_op="sum", group_name="g"), "handed over")
        self.assertEqual(
            recorder.calls,
            [
                (packet.default, (x, "sum", "g"), {}),
                (packet, (x,), {"reduce_op": "sum", "group_name": "g"}),
            ],
        )

    def test_only_collective_ops_are_hooked(self):
        # Importing these registers more ops in the same namespaces; which ops
        # are collective ops must not depend on it (ranks may import differently).
        import torch.distributed.tensor

        namespaces = {name.partition("::")[0] for name in _COLLECTIVE_OPS}
        hooked, plain = set(), set()
        for qualified in torch._C._dispatch_get_all_op_names():
            namespace, _, name = qualified.partition("::")
            if namespace not in namespaces:
                continue
            packet = getattr(getattr(torch.ops, namespace), name)
            overloads = [getattr(packet, o) for o in packet.overloads()]
            if type(packet) is _CollectiveOpOverloadPacket:
                self.assertTrue(
                    all(type(o) is _CollectiveOpOverload for o in overloads)
                )
                hooked.add(qualified)
            else:
                self.assertIs(type(packet), OpOverloadPacket)
                self.assertTrue(all(type(o) is OpOverload for o in overloads))
                plain.add(qualified)
        self.assertEqual(hooked, set(_COLLECTIVE_OPS))  # all registered, all hooked
        self.assertIn("_c10d_functional::wait_tensor", plain)
        self.assertIs(type(torch.ops.aten.add.Tensor), OpOverload)

    def test_hooked_ops_keep_what_callers_rely_on(self):
        op = torch.ops._c10d_functional.all_reduce.default
        self.assertIsInstance(op, OpOverload)
        self.assertIs(copy.deepcopy(op), op)
        self.assertEqual(str(op), "_c10d_functional.all_reduce.default")

        def f(x: torch.Tensor, group: str) -> torch.Tensor:
            return torch.ops._c10d_functional.all_reduce(x, "sum", group)

        self.assertIn("_c10d_functional::all_reduce", str(torch.jit.script(f).graph))

    @requires_gloo()
    def test_the_hook_is_per_thread(self):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.addCleanup(dist.destroy_process_group)
        recorder = _Recorder()
        _collective_op_hook.fn = recorder
        results = []

        def elsewhere():
            out = funcol.all_reduce(torch.ones(2), "sum", dist.group.WORLD)
            results.append((_collective_op_hook.fn, out))

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        self.assertEqual(results, [(None, torch.ones(2))])
        self.assertEqual(recorder.calls, [])
        group_name = dist.group.WORLD.group_name
        self.assertEqual(
            torch.ops._c10d_functional.all_reduce(torch.ones(2), "sum", group_name),
            "handed over",
        )
        self.assertEqual(len(recorder.calls), 1)

    @requires_gloo()
    def test_inductor_compiles_a_collective_op(self):
        # Inductor's collective kernels take a subclass of OpOverload.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.addCleanup(dist.destroy_process_group)

        def f(x):
            return funcol.all_reduce(x * 2, "sum", dist.group.WORLD) + 1

        torch._dynamo.reset()
        self.addCleanup(torch._dynamo.reset)
        try:
            out = torch.compile(f, fullgraph=True, backend="inductor")(torch.ones(3))
        except RuntimeError as e:
            if "not supported" in str(e) and "Python" in str(e):
                self.skipTest(f"torch.compile unavailable on this interpreter: {e}")
            raise
        self.assertEqual(out, torch.full((3,), 3.0))


if __name__ == "__main__":
    run_tests()
