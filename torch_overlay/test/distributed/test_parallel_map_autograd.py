# Owner(s): ["oncall: distributed"]
"""parallel_map and autograd: gradients and per-thread state as in the serial loop.

Items build their part of an autograd graph on worker threads, and their
collectives may be issued by other threads. These tests check, on every
rank, that a backward over what the items built (after the call, or inside
items) visits nodes and issues its collectives in the serial loop's order,
and that each item sees the thread-local state the serial loop would give
it. Values are small integers, so a collective that pairs with the wrong one
on another rank shows as a wrong number, and sums do not depend on the order
of accumulation.
"""

import contextvars
import os
import random
import re
import sys
import sysconfig
import threading
import warnings

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.threading import coordinated, item_generator, parallel_map
from torch.testing._internal.common_distributed import (
    MultiProcessTestCase,
    requires_gloo,
)
from torch.testing._internal.common_utils import run_tests


class _TensorParallelIdentity(torch.autograd.Function):
    """Megatron's "f": identity forward, all_reduce of the gradient in backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _Tag(torch.autograd.Function):
    """Identity; its backward records its tag: the backward's visit order."""

    @staticmethod
    def forward(ctx, x, tag, visits):
        ctx.tag, ctx.visits = tag, visits
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.visits.append(ctx.tag)
        return grad, None, None


def _local_work(x, steps):
    for _ in range(steps):
        x = x * 1.0
    return x


class _AutogradTestBase(MultiProcessTestCase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def _init(self):
        store = dist.FileStore(self.file_name, self.world_size)
        dist.init_process_group(
            "gloo", store=store, rank=self.rank, world_size=self.world_size
        )
        torch.set_num_threads(1)
        if sysconfig.get_config_var("Py_GIL_DISABLED"):
            self.assertFalse(
                sys._is_gil_enabled(), "free-threaded build with the GIL on"
            )

    def _leaves(self, n, size=2):
        return [
            torch.ones(size, dtype=torch.float64, requires_grad=True) for _ in range(n)
        ]

    def _grads(self, leaves):
        return [leaf.grad.tolist() for leaf in leaves]


class ParallelMapBackwardOrderTest(_AutogradTestBase):
    @property
    def world_size(self):
        return 2

    @requires_gloo()
    def test_backward_after_the_call_pairs_collectives_as_the_loop(self):
        # Each item: local work whose length differs per rank (sequence
        # lengths), then a tensor-parallel identity. The caller backpropagates
        # after parallel_map: the backward's all_reduces must go out in the
        # same order on both ranks, whichever thread built which item.
        self._init()
        rank = self.rank

        def run(map_fn, leaves):
            # Rank-dependent autograd work on the caller first (legitimate SPMD).
            _local_work(torch.ones(1, requires_grad=True), 37 * rank)

            def item(i):
                y = _local_work(leaves[i], (7 * i + 13 * rank) % 11)
                return _TensorParallelIdentity.apply(y) * (i + 1 + 10 * rank)

            sum(out.sum() for out in map_fn(item, range(6))).backward()
            return self._grads(leaves)

        expected = [[2.0 * i + 12] * 2 for i in range(6)]
        self.assertEqual(
            run(lambda f, xs: [f(x) for x in xs], self._leaves(6)), expected
        )
        for max_workers in (2, 3, 6, 3, 2):
            grads = run(
                lambda f, xs, w=max_workers: parallel_map(f, xs, max_workers=w),
                self._leaves(6),
            )
            self.assertEqual(grads, expected, f"max_workers={max_workers}")

    @requires_gloo()
    def test_a_functional_collectives_node_belongs_to_its_item(self):
        # The functional all_reduce is issued by another thread; its autograd
        # node must be numbered as the item's, between the item's other nodes,
        # not by the issuing thread's counter, which rank 0's own autograd
        # work on the caller moves ahead. Serially the identity's all_reduce
        # goes first in the backward (its branch was built later); numbered
        # by the issuing thread, rank 0 would run the functional one first.
        self._init()
        rank, group = self.rank, dist.group.WORLD

        def run(map_fn, leaves):
            _local_work(torch.ones(1, requires_grad=True), 10000 if rank == 0 else 0)

            def item(i):
                h = _local_work(leaves[i], 50)
                a = funcol.all_reduce(h * 1.0, "sum", group)
                b = _local_work(_TensorParallelIdentity.apply(h * 2.0), 30)
                return a * 3 + b * 5

            sum(out.sum() for out in map_fn(item, range(4))).backward()
            return self._grads(leaves)

        # d/dx: the all_reduce's backward sums 3 over the ranks (6), the
        # identity's sums 5 (10, times 2): 26. Crossed pairings give 24.
        expected = [[26.0] * 2] * 4
        for max_workers in (2, 4, 2):
            grads = run(
                lambda f, xs, w=max_workers: parallel_map(f, xs, max_workers=w),
                self._leaves(4),
            )
            self.assertEqual(grads, expected, f"max_workers={max_workers}")
        self.assertEqual(
            run(lambda f, xs: [f(x) for x in xs], self._leaves(4)), expected
        )

    @requires_gloo()
    def test_randomized_gradients_equal_the_loops(self):
        # Items mix tensor-parallel identities and functional collectives with
        # autograd, after random per-rank local work; some backpropagate
        # inside the item, the rest through the caller's backward. Every
        # trial's values and gradients equal the serial loop's on every rank.
        self._init()
        rank = self.rank
        trials = int(os.environ.get("PARALLEL_MAP_AUTOGRAD_TRIALS", "12"))
        for trial in range(trials):
            plan = random.Random(trial)  # the same items on every rank
            local = random.Random(1000 * trial + rank)  # each rank's own local work
            n = plan.randint(1, 7)
            steps = [
                [plan.choice("tfl") for _ in range(plan.randint(1, 4))]
                for _ in range(n)
            ]
            inside = [plan.random() < 0.3 for _ in range(n)]
            lengths = [[local.randint(0, 12) for _ in s] for s in steps]
            caller_work = local.randint(0, 300)
            max_workers = plan.randint(2, 5)
            serial = self._random_trial(steps, inside, lengths, caller_work, None)
            parallel = self._random_trial(
                steps, inside, lengths, caller_work, max_workers
            )
            self.assertEqual(
                parallel, serial, f"trial {trial}: {steps}, inside={inside}"
            )

    def _random_trial(self, steps, inside, lengths, caller_work, max_workers):
        """The leaves' gradients after one trial: serially, or with ``max_workers``."""
        rank, group, n = self.rank, dist.group.WORLD, len(steps)
        leaves = self._leaves(n)
        _local_work(torch.ones(1, requires_grad=True), caller_work)

        def item(i):
            h = leaves[i]
            for k, kind in enumerate(steps[i]):
                h = _local_work(h, lengths[i][k])
                if kind == "t":
                    h = _TensorParallelIdentity.apply(h) * (k + 2)
                elif kind == "f":
                    h = funcol.all_reduce(h * (k + 1), "sum", group)
                else:
                    h = h * (rank + 1)
            if inside[i]:
                h.sum().backward()
                return None
            return h

        if max_workers is None:
            outs = [item(i) for i in range(n)]
        else:
            outs = parallel_map(item, range(n), max_workers=max_workers)
        outs = [out for out in outs if out is not None]
        if outs:
            sum(out.sum() for out in outs).backward()
        return [
            leaf.grad.tolist() if leaf.grad is not None else None for leaf in leaves
        ]


class ParallelMapAutogradOneRankTest(_AutogradTestBase):
    @property
    def world_size(self):
        return 1

    def _visits(self, map_fn, rounds_per_item):
        """The backward's visit order of tags that items put between their nodes."""
        op = torch.ops._c10d_functional.all_reduce
        wait = torch.ops._c10d_functional.wait_tensor
        group = dist.group.WORLD.group_name
        visits = []
        leaves = self._leaves(6)

        def item(i):
            h = _Tag.apply(leaves[i] * 1.0, (i, "in"), visits)
            for k in range(rounds_per_item):
                # Called as compiled graphs and libraries call it: the op itself,
                # which another worker may issue for this one.
                h = wait(op(h, "sum", group))
                h = _Tag.apply(h, (i, k), visits)
            return h

        sum(out.sum() for out in map_fn(item, range(6))).backward()
        return visits

    @requires_gloo()
    def test_a_served_functional_op_is_numbered_as_its_items(self):
        self._init()
        serial = self._visits(lambda f, xs: [f(x) for x in xs], 2)
        for _ in range(8):
            self.assertEqual(
                self._visits(lambda f, xs: parallel_map(f, xs, max_workers=3), 2),
                serial,
            )

    @requires_gloo()
    def test_calls_nested_in_items_and_in_the_iterable_keep_the_loops_order(self):
        # A parallel_map inside an item, or inside the iterable's next(), runs
        # within the range of numbers of that item (or of the item next()
        # yields): the backward still visits everything in the loop's order.
        self._init()

        def run(map_fn):
            visits = []
            leaves = self._leaves(3)

            def inner(t, tag, factor):
                return _Tag.apply(t * factor, tag, visits)

            def items():
                for i in range(3):
                    parts = map_fn(
                        lambda j, i=i: inner(leaves[i], ("pull", i, j), j + 1), range(2)
                    )
                    yield i, _Tag.apply(sum(parts), ("pulled", i), visits)

            def item(pulled):
                i, t = pulled
                parts = map_fn(lambda j: inner(t, ("nested", i, j), j + 2), range(3))
                return _Tag.apply(sum(parts), ("item", i), visits)

            sum(out.sum() for out in map_fn(item, items())).backward()
            return visits, self._grads(leaves)

        serial = run(lambda f, xs: [f(x) for x in xs])
        self.assertEqual(run(lambda f, xs: parallel_map(f, xs, max_workers=2)), serial)

    @requires_gloo()
    def test_items_inherit_every_piece_of_the_callers_thread_state(self):
        # Every getter of per-thread state that torch has (found by name, so a
        # getter a later release adds is compared too), and the state the
        # getters do not show, as the caller sees it and as an item sees it.
        self._init()
        caller_var = contextvars.ContextVar("caller_var")
        caller_var.set("caller")

        def item(_):
            return _thread_state_snapshot()

        class FunctionMode(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        class DispatchMode(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        def pack(t):
            return t

        def unpack(t):
            return t

        anomaly = torch.is_anomaly_enabled()
        try:
            with (
                torch.autograd.set_multithreading_enabled(False),
                torch.autograd.detect_anomaly(check_nan=False),
                torch.autograd.graph.saved_tensors_hooks(pack, unpack),
                torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False),
                torch.autograd.forward_ad.dual_level(),
                torch.autograd._force_original_view_tracking(True),
                torch._C._SetExcludeDispatchKeyGuard(
                    torch._C.DispatchKey.ADInplaceOrView, True
                ),
                FunctionMode(),
                DispatchMode(),
                torch.no_grad(),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")  # anomaly mode warns
                torch._C._stash_obj_in_tls("parallel_map_test", 1)
                caller = _thread_state_snapshot()
                items = parallel_map(item, range(4), max_workers=2)
                torch._C._remove_obj_from_tls("parallel_map_test")
        finally:
            torch.autograd.set_detect_anomaly(anomaly)
        self.assertGreater(len(caller), 40)  # the discovery found the getters
        for index, seen in enumerate(items):
            differing = {
                k: (caller[k], seen.get(k)) for k in caller if seen.get(k) != caller[k]
            }
            self.assertEqual(differing, {}, f"item {index}: (caller, item)")

    @requires_gloo()
    def test_state_an_item_leaves_on_its_thread_does_not_reach_the_next_call(self):
        # Worker threads serve later calls (the pool). What an item leaves
        # switched on must not reach the items that its thread runs next:
        # they run under their own caller's state.
        from unittest import mock

        from torch.distributed.threading import _pool

        self._init()
        both_running = threading.Barrier(2, timeout=10)
        careless_threads = set()

        class FunctionMode(torch.overrides.TorchFunctionMode):
            pass

        def careless(i):
            both_running.wait()  # one item on each thread
            careless_threads.add(threading.current_thread())
            torch.set_autocast_enabled("cpu", True)
            torch.set_grad_enabled(False)
            FunctionMode().__enter__()  # never left
            return i

        def item(_):
            return threading.current_thread(), _thread_state_snapshot()

        def next_call():
            caller = _thread_state_snapshot()
            items = parallel_map(item, range(4), max_workers=2)
            self.assertLessEqual({thread for thread, _ in items}, careless_threads)
            for index, (_, seen) in enumerate(items):
                differing = {
                    k: (caller[k], seen.get(k))
                    for k in caller
                    if seen.get(k) != caller[k]
                }
                self.assertEqual(differing, {}, f"item {index}: (caller, item)")

        with mock.patch.object(_pool, "IDLE_TIMEOUT_S", 60.0):  # threads stay
            parallel_map(careless, range(2), max_workers=2)
            next_call()
            parallel_map(careless, range(2), max_workers=2)
            with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():
                next_call()

    @requires_gloo()
    def test_saved_tensor_hooks_pack_in_items_as_in_the_loop(self):
        self._init()
        packed = []

        def pack(t):  # a lossy pack, as quantizing hooks do
            packed.append(1)
            return t.to(torch.bfloat16)

        def run(map_fn):
            leaves = self._leaves(4, size=3)

            def item(i):  # saves three tensors: mul's two inputs, sin's input
                return (leaves[i] * leaves[i] * (i + 1.3)).sin().sum()

            del packed[:]
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t.double()):
                outs = map_fn(item, range(4))
            sum(outs).backward()
            return len(packed), self._grads(leaves)

        serial = run(lambda f, xs: [f(x) for x in xs])
        self.assertEqual(serial[0], 12)
        self.assertEqual(run(lambda f, xs: parallel_map(f, xs, max_workers=2)), serial)

    @requires_gloo()
    def test_mutation_of_saved_tensors_is_allowed_as_in_the_loop(self):
        self._init()

        def run(map_fn):
            leaves = self._leaves(4)

            def item(i):
                a = leaves[i] * (i + 1)
                b = a.sin()
                a.mul_(2)  # mutates what sin saved
                return (a + b).sum()

            with torch.autograd.graph.allow_mutation_on_saved_tensors():
                sum(map_fn(item, range(4))).backward()
            return self._grads(leaves)

        serial = run(lambda f, xs: [f(x) for x in xs])
        self.assertEqual(run(lambda f, xs: parallel_map(f, xs, max_workers=2)), serial)

    @requires_gloo()
    def test_checkpoint_around_parallel_map_is_refused_and_inside_items_works(self):
        self._init()
        leaves = self._leaves(4)

        def item(i):
            return (leaves[i] * (i + 1)).sin().sum()

        with self.assertRaisesRegex(RuntimeError, "use_reentrant=False"):
            torch.utils.checkpoint.checkpoint(
                lambda: parallel_map(item, range(4), max_workers=2), use_reentrant=False
            )

        def checkpointed(i):
            return torch.utils.checkpoint.checkpoint(item, i, use_reentrant=False)

        sum(checkpointed(i) for i in range(4)).backward()
        serial = self._grads(leaves)
        for leaf in leaves:
            leaf.grad = None
        sum(parallel_map(checkpointed, range(4), max_workers=2)).backward()
        self.assertEqual(self._grads(leaves), serial)

    @requires_gloo()
    def test_autocast_without_its_cache_stays_without_it(self):
        self._init()

        def run(map_fn):
            weights = [torch.ones(4, 4, requires_grad=True) for _ in range(4)]
            x = torch.ones(4, 4)

            def item(i):
                first = (weights[i] @ x).sum().item()
                with torch.no_grad():
                    weights[i].add_(1)  # a cached low-precision copy would be stale
                return first, (weights[i] @ x).sum().item()

            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                return map_fn(item, range(4))

        serial = run(lambda f, xs: [f(x) for x in xs])
        self.assertEqual(serial[0], (64.0, 128.0))
        self.assertEqual(run(lambda f, xs: parallel_map(f, xs, max_workers=2)), serial)

    @requires_gloo()
    def test_an_items_own_autocast_region_keeps_the_cache_as_the_loop_does(self):
        # Autocast's cache of casts is process-wide and cleared when the
        # outermost region ends. An item's own region is nested in the
        # caller's, as in the loop: leaving it must not clear the cache.
        self._init()

        def run(map_fn):
            weight = torch.ones(4, 4, requires_grad=True)
            x = torch.ones(4, 4)

            def item(i):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return (x * i).sum().item()

            with torch.autocast("cpu", dtype=torch.bfloat16):
                before = (weight @ x).sum().item()  # caches weight's cast
                map_fn(item, range(4))
                with torch.no_grad():
                    weight.add_(1)  # the cache does not see this, in the loop either
                return before, (weight @ x).sum().item()

        serial = run(lambda f, xs: [f(x) for x in xs])
        self.assertEqual(serial, (64.0, 64.0))
        self.assertEqual(run(lambda f, xs: parallel_map(f, xs, max_workers=2)), serial)

    @requires_gloo()
    def test_coordinated_functions_run_in_the_items_state_and_context(self):
        self._init()
        var = contextvars.ContextVar("var", default="caller")
        seen = {}

        @coordinated
        def observe(i, a, b):
            seen[i] = (
                (a @ b).dtype,
                var.get(),
                item_generator().initial_seed(),
                threading.get_ident(),
            )
            var.set(f"set by coordinated {i}")
            # as in the loop, the item goes on without grad
            torch.set_grad_enabled(False)

        def item(i):
            var.set(f"item {i}")
            a = torch.ones(2, 2)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                observe(i, a, a)
            grad_after = torch.is_grad_enabled()
            torch.set_grad_enabled(True)
            return var.get(), item_generator().initial_seed(), grad_after

        results = parallel_map(item, range(4), max_workers=2)
        for i in range(4):
            dtype, value, seed, thread = seen[i]
            self.assertEqual(dtype, torch.bfloat16)
            self.assertEqual(value, f"item {i}")
            self.assertEqual(seed, results[i][1])
            self.assertEqual(thread, threading.get_ident())  # the coordinating thread
            self.assertEqual(results[i][0], f"set by coordinated {i}")
            self.assertFalse(results[i][2])
        # the coordinating thread's own is back
        self.assertTrue(torch.is_grad_enabled())

    @requires_gloo()
    def test_functional_collective_in_vmap_and_grad_as_in_the_loop(self):
        self._init()
        group = dist.group.WORLD

        def in_vmap(i):
            x = torch.arange(6.0).reshape(3, 2) + i
            return torch.func.vmap(lambda t: funcol.all_reduce(t, "sum", group))(x)

        serial = [in_vmap(i) for i in range(4)]
        self.assertEqual(parallel_map(in_vmap, range(4), max_workers=2), serial)

        def in_grad(i):
            x = torch.ones(2) + i
            return torch.func.grad(lambda t: funcol.all_reduce(t, "sum", group).sum())(
                x
            )

        try:
            serial = ("returned", [in_grad(i) for i in range(4)])
        except Exception as error:
            serial = ("raised", type(error), str(error))
        try:
            parallel = ("returned", parallel_map(in_grad, range(4), max_workers=2))
        except Exception as error:
            parallel = ("raised", type(error), str(error))
        self.assertEqual(parallel, serial)

    @requires_gloo()
    def test_coalescing_leaves_what_c10d_refuses_to_c10d(self):
        self._init()

        def item(i):
            dist.all_reduce(torch.ones(2, dtype=torch.complex64).conj())

        with self.assertRaises(RuntimeError) as serial:
            item(0)
        with self.assertRaises(RuntimeError) as parallel:
            # Every item has a slot, so every item runs, and each must raise.
            parallel_map(item, range(4), max_workers=4, coalesce_all_reduces=True)
        self.assertEqual(str(parallel.exception), str(serial.exception))
        notes = getattr(parallel.exception, "__notes__", [])
        self.assertEqual(
            [
                n
                for n in notes
                if str(serial.exception).splitlines()[0] in n and "also failed" in n
            ],
            notes,
        )
        self.assertEqual(len(notes), 3, notes)

    @requires_gloo()
    def test_an_item_beyond_its_range_of_numbers_raises(self):
        from torch.distributed.threading import _thread_state

        self._init()

        def item(i):
            if i == 1:  # as if it had created 2**32 nodes
                _thread_state.set_sequence_nr(
                    _thread_state.get_sequence_nr() + (1 << 32)
                )
            return (torch.ones(1, requires_grad=True) * 2).sum()

        with self.assertRaisesRegex(
            RuntimeError, "item 1 used more than its 4294967296"
        ):
            parallel_map(item, range(3), max_workers=2)

    @requires_gloo()
    def test_calls_that_build_no_graph_use_no_sequence_numbers(self):
        # Ranges are reserved, numbers used: a call (or many nested calls)
        # that creates no autograd node leaves the counter where it was, so
        # neither a thread's lifetime nor an item's range runs out.
        from torch.distributed.threading import _thread_state

        self._init()

        def item(i):
            for _ in range(300):  # 1,200 nested items: more than a range divides into
                parallel_map(lambda j: torch.ones(2) * j, range(4), max_workers=2)
            return i

        start = _thread_state.get_sequence_nr()
        self.assertEqual(parallel_map(item, range(2), max_workers=2), [0, 1])
        self.assertEqual(
            parallel_map(lambda i: torch.ones(1) * i, range(100), max_workers=2)[1],
            torch.ones(1),
        )
        self.assertEqual(_thread_state.get_sequence_nr(), start)


# Getters of per-thread state, found by name in these namespaces; called
# without arguments.
_GETTER = re.compile(r"^_?(is|get)_\w*(enabled|mode|modes|state|disabled|tls)$")


def _getters():
    found = {}
    for module in (torch, torch._C, torch._C._autograd, torch._C._functorch):
        for name in dir(module):
            if _GETTER.match(name):
                found[f"{module.__name__}.{name}"] = getattr(module, name)
    return found


def _thread_state_snapshot():
    """What this thread sees of every piece of per-thread state we can read."""
    snapshot = {}
    for name, getter in _getters().items():
        try:
            value = getter()
        except Exception:  # needs arguments, or not available here
            continue
        if isinstance(value, torch.Tensor):  # a value, not state
            continue
        plain = value is None or isinstance(value, (bool, int, float, str, torch.dtype))
        snapshot[name] = value if plain else repr(value)
    for device in ("cpu", "cuda"):
        snapshot[f"autocast {device}"] = (
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
    snapshot["autocast cache"] = torch.is_autocast_cache_enabled()
    snapshot["dispatch include"] = repr(torch._C._dispatch_tls_local_include_set())
    snapshot["dispatch exclude"] = repr(torch._C._dispatch_tls_local_exclude_set())
    snapshot["function modes"] = [
        type(torch._C._get_function_stack_at(i)).__name__
        for i in range(torch._C._len_torch_function_stack())
    ]
    snapshot["dispatch modes"] = [
        type(torch._C._get_dispatch_stack_at(i)).__name__
        for i in range(torch._C._len_torch_dispatch_stack())
    ]
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    snapshot["saved tensor hooks"] = (
        None if hooks is None else [h.__name__ for h in hooks]
    )
    snapshot["functorch interpreters"] = repr(
        torch._C._functorch.peek_interpreter_stack()
    )
    snapshot["tls object"] = torch._C._is_key_in_tls("parallel_map_test")
    snapshot["anomaly"] = (
        torch.is_anomaly_enabled(),
        torch.is_anomaly_check_nan_enabled(),
    )
    snapshot["fw grad"] = torch._C._is_fwd_grad_enabled()
    snapshot["view replay"] = torch._C._is_view_replay_enabled()
    snapshot["multithreading"] = torch._C._is_multithreading_enabled()
    snapshot["grad"] = torch.is_grad_enabled()
    snapshot["contextvars"] = sorted(
        (var.name, repr(value))
        for var, value in contextvars.copy_context().items()
        if not var.name.startswith("torch.distributed.threading")
    )
    return snapshot


if __name__ == "__main__":
    run_tests()
