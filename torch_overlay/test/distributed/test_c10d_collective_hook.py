# Owner(s): ["oncall: distributed"]
"""The per-thread collective hook in distributed_c10d.py and _functional_collectives.py."""

import ast
import re
import inspect
import textwrap
import threading
import warnings

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
from torch.distributed.distributed_c10d import _collective_hook
from torch.testing._internal.common_utils import (
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
    TestCase,
)


class _Recorder:
    """A hook that records each call and returns a marker instead of running it."""

    def __init__(self):
        self.calls = []
        self.marker = object()

    def __call__(self, fn, /, **kwargs):
        self.calls.append((fn, kwargs))
        return self.marker


def _t():
    return torch.ones(2)


# (entry point the hook receives, function called, args, kwargs)
_C10D_CALLS = [
    ("broadcast", c10d.broadcast, (_t(),), {"src": 0}),
    ("all_reduce", c10d.all_reduce, (_t(),), {"async_op": True}),
    ("all_reduce_coalesced", c10d.all_reduce_coalesced, ([_t()],), {}),
    ("reduce", c10d.reduce, (_t(),), {"dst": 0}),
    ("all_gather", c10d.all_gather, ([_t()], _t()), {}),
    ("all_gather_single", c10d.all_gather_single, (_t(), _t()), {}),
    ("all_gather_single", c10d.all_gather_into_tensor, (_t(), _t()), {}),
    ("all_gather_coalesced", c10d.all_gather_coalesced, ([[_t()]], [_t()]), {}),
    ("gather", c10d.gather, (_t(),), {"dst": 0}),
    ("scatter", c10d.scatter, (_t(),), {"src": 0}),
    ("reduce_scatter", c10d.reduce_scatter, (_t(), [_t()]), {}),
    ("reduce_scatter_single", c10d.reduce_scatter_single, (_t(), _t()), {}),
    ("reduce_scatter_single", c10d.reduce_scatter_tensor, (_t(), _t()), {}),
    ("all_to_all", c10d.all_to_all, ([_t()], [_t()]), {}),
    ("all_to_all_single", c10d.all_to_all_single, (_t(), _t()), {}),
    ("barrier", c10d.barrier, (), {}),
    ("monitored_barrier", c10d.monitored_barrier, (), {}),
    ("send", c10d.send, (_t(), 1), {}),
    ("recv", c10d.recv, (_t(),), {}),
    ("isend", c10d.isend, (_t(), 1), {}),
    ("irecv", c10d.irecv, (_t(),), {"src": 1}),
    ("batch_isend_irecv", c10d.batch_isend_irecv, (["not validated"],), {}),
    ("all_gather_object", c10d.all_gather_object, ([None], "x"), {}),
    ("gather_object", c10d.gather_object, ("x",), {}),
    ("broadcast_object_list", c10d.broadcast_object_list, (["x"],), {}),
    ("scatter_object_list", c10d.scatter_object_list, ([None], ["x"]), {}),
    ("send_object_list", c10d.send_object_list, (["x"], 1), {}),
    ("recv_object_list", c10d.recv_object_list, ([None],), {}),
    ("new_group", c10d.new_group, ([0],), {}),
    ("new_subgroups", c10d.new_subgroups, (), {"group_size": 1}),
    ("split_group", c10d.split_group, (), {"split_ranks": [[0]]}),
]

_FUNCOL_CALLS = [
    ("broadcast", funcol.broadcast, (_t(), 0, [0]), {}),
    ("all_reduce", funcol.all_reduce, (_t(), "sum", [0]), {}),
    ("all_gather_single", funcol.all_gather_single, (_t(), 0, [0]), {}),
    ("all_gather_single", funcol.all_gather_tensor, (_t(), 0, [0]), {}),
    ("reduce_scatter_single", funcol.reduce_scatter_single, (_t(), "sum", 0, [0]), {}),
    ("reduce_scatter_single", funcol.reduce_scatter_tensor, (_t(), "sum", 0, [0]), {}),
    ("all_reduce_coalesced", funcol.all_reduce_coalesced, ([_t()], "sum", [0]), {}),
    (
        "all_gather_single_coalesced",
        funcol.all_gather_single_coalesced,
        ([_t()], [0]),
        {},
    ),
    (
        "reduce_scatter_single_coalesced",
        funcol.reduce_scatter_single_coalesced,
        ([_t()], "sum", [0], [0]),
        {},
    ),
    ("all_to_all_single", funcol.all_to_all_single, (_t(), None, None, [0]), {}),
]


def _expected_kwargs(fn, args, kwargs):
    bound = inspect.signature(inspect.unwrap(fn)).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class CollectiveHookTest(TestCase):
    def setUp(self):
        super().setUp()
        self.assertIsNone(_collective_hook.fn)
        self.recorder = _Recorder()
        _collective_hook.fn = self.recorder

    def tearDown(self):
        _collective_hook.fn = None
        super().tearDown()

    def _check(self, module, name, fn, args, kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out = fn(*args, **kwargs)
        self.assertIs(out, self.recorder.marker)
        self.assertEqual(len(self.recorder.calls), 1)
        got_fn, got_kwargs = self.recorder.calls[0]
        entry_point = getattr(module, name)
        self.assertIs(got_fn, entry_point)
        # Every parameter, by keyword, so the hook can re-issue the call.
        if fn is entry_point:
            expected = _expected_kwargs(entry_point, args, kwargs)
            self.assertEqual(list(got_kwargs), list(expected))
            for key, value in expected.items():
                self.assertIs(got_kwargs[key], value, key)
        else:  # a deprecated alias that forwards to the entry point
            self.assertEqual(
                list(got_kwargs),
                list(inspect.signature(inspect.unwrap(entry_point)).parameters),
            )

    @parametrize("case", _C10D_CALLS, name_fn=lambda case: case[1].__name__)
    def test_c10d_entry_point_calls_the_hook(self, case):
        self._check(c10d, *case)

    @parametrize("case", _FUNCOL_CALLS, name_fn=lambda case: case[1].__name__)
    def test_functional_collective_calls_the_hook(self, case):
        self._check(funcol, *case)

    def test_entry_points_are_covered(self):
        # Every public c10d function that communicates appears above.
        covered = {fn.__name__ for _, fn, _, _ in _C10D_CALLS}
        for name in dist.distributed_c10d.__all__:
            fn = getattr(c10d, name)
            if not inspect.isfunction(fn):
                continue
            source = inspect.getsource(inspect.unwrap(fn))
            if "_collective_hook.fn" in source:
                self.assertIn(name, covered)

    def test_every_public_function_that_communicates_calls_the_hook(self):
        # A public c10d function that calls a collective method of a process
        # group (one that returns a Work) itself must hand the call to the
        # hook: one that did not would reach the group unseen by the hook's
        # owner. The methods come from the bindings, so a new one counts too.
        returns_work = re.compile(r"-> (c10d::|torch\._C\._distributed_c10d\.)Work\b")
        collectives = {
            name
            for owner in (dist.ProcessGroup, torch._C._distributed_c10d.Backend)
            for name, method in vars(owner).items()
            if returns_work.search(getattr(method, "__doc__", None) or "")
        }
        self.assertLessEqual(
            {"allreduce", "broadcast", "allgather", "send", "recv", "barrier"},
            collectives,
        )
        communicating, unhooked = set(), []
        for name in c10d.__all__:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated names
                fn = getattr(c10d, name)
            if not inspect.isfunction(fn):
                continue
            tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
            attributes = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
            calls = {
                node.func.attr
                for node in ast.walk(tree)
                if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in collectives
            }
            if calls:
                communicating.add(name)
                # The hook line reads `_collective_hook.fn` (code, not a comment).
                if not any(
                    a.attr == "fn"
                    and isinstance(a.value, ast.Name)
                    and a.value.id == "_collective_hook"
                    for a in attributes
                ):
                    unhooked.append(f"{name} (calls {', '.join(sorted(calls))})")
        # The check reaches the functions it is for.
        self.assertLessEqual(
            {"all_reduce", "broadcast", "barrier", "isend"}, communicating
        )
        self.assertEqual(
            unhooked, [], "public c10d functions that communicate without the hook"
        )

    def test_hook_is_per_thread(self):
        seen = []

        def other_thread():
            seen.append(_collective_hook.fn)
            try:
                dist.all_reduce(torch.ones(1))  # no process group: must really run
            except (RuntimeError, ValueError) as e:
                seen.append(type(e))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        self.assertIsNone(seen[0])
        self.assertEqual(len(seen), 2)
        self.assertEqual(self.recorder.calls, [])


class UnhookedPathsTest(TestCase):
    """Without a hook, collectives and their compiled forms behave as before."""

    def setUp(self):
        super().setUp()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def tearDown(self):
        dist.destroy_process_group()
        super().tearDown()

    def test_eager_collectives_run(self):
        t = torch.ones(3)
        dist.all_reduce(t)
        self.assertEqual(t, torch.ones(3))
        out = funcol.all_reduce(torch.ones(3), "sum", dist.group.WORLD)
        self.assertEqual(out, torch.ones(3))

    def test_compiled_functional_collective_traces_fullgraph(self):
        def f(x):
            return funcol.all_reduce(x * 2, "sum", dist.group.WORLD) + 1

        try:
            compiled = torch.compile(f, fullgraph=True, backend="eager")
            out = compiled(torch.ones(3))
        except RuntimeError as e:
            if "not supported" in str(e) and "Python" in str(e):
                self.skipTest(f"torch.compile unavailable on this interpreter: {e}")
            raise
        self.assertEqual(out, torch.full((3,), 3.0))

    def test_dynamo_never_reads_the_hook(self):
        # A function traced on a thread with a hook gets the graph and guards it
        # gets on any other thread: the hook is neither called nor traced.
        def f(x):
            y = x * 2
            dist.all_reduce(y)
            return funcol.all_reduce(y, "sum", dist.group.WORLD) + 1

        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm.code)

            def run(*args):  # run unhooked, whatever the thread
                saved, _collective_hook.fn = _collective_hook.fn, None
                try:
                    return gm.forward(*args)
                finally:
                    _collective_hook.fn = saved

            return run

        hooked = []

        def recorder(fn, /, **kwargs):  # records, then runs the call unhooked
            hooked.append(fn)
            saved, _collective_hook.fn = _collective_hook.fn, None
            try:
                return fn(**kwargs)
            finally:
                _collective_hook.fn = saved

        results = []

        def traced_with_hook():
            _collective_hook.fn = recorder
            try:
                results.append(compiled(torch.ones(3)))
            finally:
                _collective_hook.fn = None

        torch._dynamo.reset()
        try:
            compiled = torch.compile(f, fullgraph=True, backend=backend)
            compiled(torch.ones(3))  # traced on this thread, no hook
            torch._dynamo.reset()
            compiled = torch.compile(f, fullgraph=True, backend=backend)
            t = threading.Thread(target=traced_with_hook)
            t.start()
            t.join()
        except RuntimeError as e:
            if "not supported" in str(e) and "Python" in str(e):
                self.skipTest(f"torch.compile unavailable on this interpreter: {e}")
            raise
        # Only entry points matter here: a hook's owner may also hook the ops.
        entry_points = {c10d.all_reduce, funcol.all_reduce, funcol.all_reduce_inplace}
        self.assertEqual([fn for fn in hooked if fn in entry_points], [])
        self.assertEqual(len(graphs), 2)
        self.assertEqual(graphs[0], graphs[1])
        self.assertIn("_c10d_functional.all_reduce", graphs[1])
        self.assertEqual(results[0], torch.full((3,), 3.0))
        with torch._dynamo.config.patch(error_on_recompile=True):
            self.assertEqual(compiled(torch.ones(3)), torch.full((3,), 3.0))
        torch._dynamo.reset()


instantiate_parametrized_tests(CollectiveHookTest)


if __name__ == "__main__":
    run_tests()
