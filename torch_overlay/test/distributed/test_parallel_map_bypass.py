# Owner(s): ["oncall: distributed"]
"""Nothing reaches a process group outside parallel_map's schedule.

Compiled code (``torch.compile`` with the eager, aot_eager and inductor
backends) that calls ``dist.*``, functional collectives or DTensor goes
through the schedule and returns the serial loop's results, wherever it was
compiled first. What cannot be scheduled (a direct ProcessGroup call, a thread
that ``fn`` starts, the process-wide coalescing manager) raises on every rank, in time, and leaves a process
group that the next parallel_map can use. Items sleep for random times that
differ between ranks, so that an unscheduled collective pairs up wrongly.
"""

import datetime
import os
import random
import sys
import sysconfig
import threading
import time
from unittest import mock

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch._ops import _collective_op_hook
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.distributed_c10d import _collective_hook
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.threading import _op_hook, _pool, coordinated, parallel_map
from torch.testing._internal.common_distributed import (
    MultiProcessTestCase,
    requires_gloo,
    skip_if_lt_x_gpu,
)
from torch.testing._internal.common_utils import (
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
    TestCase,
)


_ITEMS = 12
_PG_TIMEOUT_S = 20.0
_BYPASS = "outside the schedule"
# What c10d's bindings raise for a ProcessGroup method called directly on a worker.
_REFUSED = "refuses collectives called directly"


class _Base(MultiProcessTestCase):
    @property
    def world_size(self):
        return 2

    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def _init(self):
        store = dist.FileStore(self.file_name, self.world_size)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=_PG_TIMEOUT_S),
        )
        torch.set_num_threads(1)
        rng = random.Random(1000 * self.rank + 17)  # differs between ranks
        self.delays = [rng.random() * 0.004 for _ in range(_ITEMS)]

    def _assert_gil_off(self):
        if sysconfig.get_config_var("Py_GIL_DISABLED"):
            self.assertFalse(
                sys._is_gil_enabled(), "free-threaded build with the GIL on"
            )

    def _value(self, i):
        """What item i contributes on this rank: only the right pairing sums right."""
        return torch.full((2,), float(i * (self.rank + 1)))

    def _reduced(self, i):
        return float(i * sum(r + 1 for r in range(self.world_size)))

    def _assert_clean(self):
        # Only idle pooled threads outlive a call (one whose idle time just
        # ran out may still be exiting), and the caller's hook is not left set.
        self.assertIsNone(_collective_hook.fn)
        for _ in range(100):
            workers = [
                t for t in threading.enumerate() if t.name.startswith("parallel_map")
            ]
            if len(workers) == _pool.pool.idle_count():
                return
            time.sleep(0.05)
        self.fail(f"{len(workers)} worker threads, {_pool.pool.idle_count()} idle")

    def _assert_usable_again(self):
        def item(i):
            time.sleep(self.delays[i])
            t = self._value(i)
            dist.all_reduce(t)
            return t[0].item()

        results = parallel_map(item, range(_ITEMS), max_workers=4)
        self.assertEqual(results, [self._reduced(i) for i in range(_ITEMS)])


@instantiate_parametrized_tests
class CompiledCollectivesTest(_Base):
    """The compile matrix: backend x where it was compiled first."""

    def _check_backend(self, backend, first):
        self._init()
        ws = self.world_size
        mesh = init_device_mesh("cpu", (ws,))

        def body(x):
            y = x * 1
            dist.all_reduce(y)  # rewritten by Dynamo into a functional collective
            z = funcol.all_reduce(x * 2, "sum", dist.group.WORLD)
            dt = DTensor.from_local(x * 3, mesh, [Shard(0)])
            full = dt.redistribute(mesh, [Replicate()]).to_local()  # an all_gather
            return y + 0, z + 0, full + 0

        def expected(i):
            gathered = torch.cat(
                [torch.full((2,), float(3 * i * (r + 1))) for r in range(ws)]
            )
            return [self._reduced(i)] * 2, [2 * self._reduced(i)] * 2, gathered.tolist()

        torch._dynamo.reset()
        compiled = torch.compile(body, backend=backend, fullgraph=True)
        if first == "caller":  # a warm-up step before the parallel part
            out = compiled(self._value(1))
            self.assertEqual([t.tolist() for t in out], list(expected(1)))

        def item(i):
            time.sleep(self.delays[i])
            return [t.tolist() for t in compiled(self._value(i))]

        # Compiled once, whoever was first: no thread recompiles.
        with torch._dynamo.config.patch(error_on_recompile=first == "caller"):
            results = parallel_map(item, range(_ITEMS), max_workers=4)
        self._assert_gil_off()
        self.assertEqual(results, [list(expected(i)) for i in range(_ITEMS)])
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(self._value(5))  # and on the caller again, unchanged
        self.assertEqual([t.tolist() for t in out], list(expected(5)))
        self._assert_clean()

    @requires_gloo()
    def test_coordinated_in_compiled_code(self):
        # Traced, a coordinated function would be inlined and run by each worker
        # in timing order; it breaks the graph instead, and fullgraph says why.
        self._init()
        acc = torch.zeros(1)

        @coordinated
        def record(x):  # order-sensitive
            acc.mul_(2).add_(x)

        def step(x):
            record(x.sum())
            return x * 2

        def run(fn):
            acc.zero_()

            def item(i):
                time.sleep(self.delays[i])
                return fn(torch.full((1,), float(i))).item()

            parallel_map(item, range(_ITEMS), max_workers=4)
            return acc.item()

        torch._dynamo.reset()
        compiled = torch.compile(step, backend="eager")
        compiled(torch.zeros(1))  # compiled first on the caller
        self.assertEqual(run(compiled), run(step))
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, run(compiled))
        self.assertEqual(len(set(gathered)), 1, gathered)
        torch._dynamo.reset()
        with self.assertRaisesRegex(Exception, "coordinating thread at run time"):
            torch.compile(step, backend="eager", fullgraph=True)(torch.zeros(1))
        torch._dynamo.reset()

    @parametrize("compiled_first_on", ["caller", "worker"])
    @requires_gloo()
    def test_compiled_eager(self, compiled_first_on):
        self._check_backend("eager", compiled_first_on)

    @parametrize("compiled_first_on", ["caller", "worker"])
    @requires_gloo()
    def test_compiled_aot_eager(self, compiled_first_on):
        self._check_backend("aot_eager", compiled_first_on)

    @parametrize("compiled_first_on", ["caller", "worker"])
    @requires_gloo()
    def test_compiled_inductor(self, compiled_first_on):
        self._check_backend("inductor", compiled_first_on)


class BypassDetectionTest(_Base):
    """Each way around the schedule raises on every rank, in time."""

    def _check_raises(self, item, expected=_BYPASS):
        """Every rank raises in time, leaves no thread, and the process group works on."""
        with self.assertRaisesRegex(RuntimeError, expected) as raised:
            parallel_map(item, range(_ITEMS), max_workers=4)
        # In time: an item left waiting on its peer until the process group's
        # timeout would add its own error (a timeout) as a note.
        for note in getattr(raised.exception, "__notes__", []):
            self.assertRegex(
                note, f"CollectiveBypassError|CollectiveCancelledError|{expected}"
            )
        self._assert_clean()
        self._assert_usable_again()
        self._assert_clean()

    @requires_gloo()
    def test_process_group_method(self):
        def item(i):
            time.sleep(self.delays[i])
            t = self._value(i)
            dist.group.WORLD.allreduce([t]).wait()
            return t[0].item()

        self._init()
        self._check_raises(item, _REFUSED)

    @requires_gloo()
    def test_process_group_outside_the_registry(self):
        # Built directly, the group has no counter the detector knows of: the
        # call itself must refuse.
        def item(i):
            time.sleep(self.delays[i])
            t = self._value(i)
            side.allreduce([t]).wait()
            return t[0].item()

        self._init()
        store = dist.PrefixStore("side", dist.distributed_c10d._get_default_store())
        side = dist.ProcessGroupGloo(store, self.rank, self.world_size)
        self._check_raises(item, _REFUSED)

    @requires_gloo()
    def test_only_workers_refuse_direct_calls(self):
        # Items run on workers, which refuse; the iterable runs on the
        # coordinating thread, which issues the schedule's calls and does not.
        # A nested call's coordinating thread is a worker: it and its items do.
        refuses = torch._C._distributed_c10d._refuses_direct_collectives
        seen_by_items, seen_by_iterable, seen_nested = [], [], []

        def items(seen, n):
            for i in range(n):
                seen.append(refuses())
                yield i

        def item(i):
            time.sleep(self.delays[i])
            seen_by_items.append(refuses())
            t = self._value(i)
            dist.all_reduce(t)  # issued at the turn: the issuer does not refuse
            seen_by_items.append(refuses())
            if i == 0:
                seen_nested.extend(
                    parallel_map(
                        lambda _: refuses(), items(seen_nested, 3), max_workers=2
                    )
                )
            return t[0].item()

        self._init()
        self.assertFalse(refuses())
        results = parallel_map(item, items(seen_by_iterable, _ITEMS), max_workers=4)
        self.assertFalse(refuses())
        self.assertEqual(results, [self._reduced(i) for i in range(_ITEMS)])
        self.assertEqual(seen_by_items, [True] * (2 * _ITEMS))
        self.assertEqual(seen_by_iterable, [False] * _ITEMS)
        self.assertEqual(seen_nested, [True] * 6)
        self._assert_clean()

    @requires_gloo()
    def test_thread_started_by_fn(self):
        def item(i):
            time.sleep(self.delays[i])
            t = self._value(i)
            thread = threading.Thread(target=dist.all_reduce, args=(t,))
            thread.start()
            thread.join()
            return t[0].item()

        self._init()
        self._check_raises(item)

    @requires_gloo()
    def test_coalescing_manager(self):
        def item(i):
            time.sleep(self.delays[i])
            t = self._value(i)
            with dist._coalescing_manager():
                dist.all_reduce(t)
            return t[0].item()

        self._init()
        self._check_raises(item)

    @requires_gloo()
    @skip_if_lt_x_gpu(1)
    def test_backward_on_autograd_device_thread(self):
        # CUDA backward runs on autograd's device threads, which have no hook.
        class ReduceGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                grad = grad.clone()
                dist.all_reduce(grad)
                return grad

        def item(i):
            time.sleep(self.delays[i])
            x = self._value(i).cuda().requires_grad_()
            ReduceGrad.apply(x).sum().backward()
            return x.grad.tolist()

        self._init()
        self._check_raises(item)

    @requires_gloo()
    def test_detection_can_be_turned_off(self):
        # A thread that fn starts is seen by the counters only; turned off, the
        # call returns (refusals stay on).
        self._init()
        with mock.patch.dict(
            os.environ, {"TORCH_DISTRIBUTED_THREADING_DETECT_BYPASS": "0"}
        ):

            def item(i):
                t = self._value(i)
                thread = threading.Thread(target=dist.all_reduce, args=(t,))
                thread.start()
                thread.join()  # values may pair up wrongly: not checked
                return t.shape

            self.assertEqual(parallel_map(item, range(4), max_workers=2), [(2,)] * 4)


class OpHookTest(TestCase):
    """What torch.distributed.threading does to the functional collective ops."""

    def test_workers_have_the_op_hook_exactly_while_they_have_the_collective_hook(
        self,
    ):
        seen = []

        def in_a_thread():
            seen.append(("thread", _collective_op_hook.fn))

        def item(i):
            seen.append(("item", _collective_op_hook.fn))
            thread = threading.Thread(target=in_a_thread)
            thread.start()
            thread.join()
            return i

        self.assertEqual(parallel_map(item, range(4), max_workers=2), list(range(4)))
        self.assertEqual(seen.count(("item", _op_hook.functional_op_hook)), 4)
        self.assertEqual(seen.count(("thread", None)), 4)
        self.assertIsNone(_collective_op_hook.fn)

    @requires_gloo()
    def test_a_functional_op_may_be_issued_for_another_item_on_torchs_backends(self):
        from torch.distributed.threading._calls import (
            ASYNC_THEN_WAIT,
            Call,
            call_functional_op,
            issue_runs_torch_only,
        )
        from torch.distributed.threading._thread_state import CallState

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.addCleanup(dist.destroy_process_group)
        op = torch.ops._c10d_functional.all_reduce.default

        def runs_torch_only(*args):
            kwargs = {"op": op, "args": args, "kwargs": {}}
            state = CallState.capture()
            call = Call(call_functional_op, kwargs, ASYNC_THEN_WAIT, 0, 0, None, state)
            return issue_runs_torch_only(call)

        class Subclass(torch.Tensor):
            pass

        plain, world = torch.zeros(1), dist.group.WORLD.group_name
        self.assertTrue(runs_torch_only(plain, "sum", world))
        self.assertTrue(runs_torch_only(plain, "sum", dist.group.WORLD))
        self.assertFalse(runs_torch_only(plain, "sum", "no group of this name"))
        self.assertFalse(runs_torch_only(plain.as_subclass(Subclass), "sum", world))


if __name__ == "__main__":
    run_tests()
