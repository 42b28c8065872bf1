# Owner(s): ["oncall: distributed"]
"""DDP's C++ collectives reach the per-thread collective hook (torch/distributed/utils.py)."""

import ast
import pathlib

import torch
import torch.distributed as dist
import torch.distributed.utils as dist_utils
from torch.distributed.distributed_c10d import _collective_hook
from torch.nn.parallel import DistributedDataParallel
from torch.testing._internal.common_distributed import requires_gloo
from torch.testing._internal.common_utils import run_tests, TestCase


# The C++ collectives DDP calls from Python, and the one function each may
# be called from.
_CPP_COLLECTIVES = {
    "_broadcast_coalesced": "_sync_params_and_buffers",
    "_verify_params_across_processes": "_verify_param_shape_across_processes",
}


class DDPCollectiveHookTest(TestCase):
    def setUp(self):
        super().setUp()
        self.calls = []

    def tearDown(self):
        _collective_hook.fn = None
        if dist.is_initialized():
            dist.destroy_process_group()
        super().tearDown()

    def _init(self):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def _hooked(self, fn):
        """Run ``fn`` with a hook that records each call, then runs it unhooked."""

        def hook(entry_point, /, **kwargs):
            self.calls.append((entry_point, kwargs))
            _collective_hook.fn = None
            try:
                return entry_point(**kwargs)
            finally:
                _collective_hook.fn = hook

        _collective_hook.fn = hook
        try:
            return fn()
        finally:
            _collective_hook.fn = None

    def _issued(self):
        return dist.group.WORLD._get_sequence_number_for_group()

    @requires_gloo()
    def test_functions_call_the_hook_with_all_their_arguments(self):
        self._init()
        group, tensors = dist.group.WORLD, [torch.ones(2)]
        before = self._issued()
        self._hooked(
            lambda: dist_utils._verify_param_shape_across_processes(group, tensors)
        )
        self._hooked(lambda: dist_utils._sync_params_and_buffers(group, tensors, 64, 0))
        expected = [
            (
                dist_utils._verify_param_shape_across_processes,
                {"process_group": group, "tensors": tensors, "logger": None},
            ),
            (
                dist_utils._sync_params_and_buffers,
                {
                    "process_group": group,
                    "module_states": tensors,
                    "broadcast_bucket_size": 64,
                    "src": 0,
                },
            ),
        ]
        self.assertEqual(len(self.calls), len(expected))
        for (fn, kwargs), (want_fn, want_kwargs) in zip(
            self.calls, expected, strict=True
        ):
            self.assertIs(fn, want_fn)
            self.assertEqual(list(kwargs), list(want_kwargs))
            for key, value in want_kwargs.items():
                self.assertIs(kwargs[key], value, key)
        # The hook ran them: the group counted their collectives.
        self.assertGreater(self._issued(), before)

    @requires_gloo()
    def test_ddp_hands_every_collective_to_the_hook(self):
        self._init()
        model = torch.nn.BatchNorm1d(2)  # has buffers, broadcast in forward
        before = self._issued()
        ddp = self._hooked(lambda: DistributedDataParallel(model))
        self.assertEqual(
            [fn.__name__ for fn, _ in self.calls],
            ["_verify_param_shape_across_processes", "_sync_params_and_buffers"],
        )
        self.calls.clear()
        self._hooked(lambda: ddp(torch.randn(4, 2)))
        self.assertEqual(
            [fn.__name__ for fn, _ in self.calls], ["_sync_params_and_buffers"]
        )
        self.assertGreater(self._issued(), before)

    def test_no_other_python_caller_of_the_cpp_collectives(self):
        # A new caller of either C++ function would reach a process group
        # without the hook: every call must come from its hooked function.
        root = pathlib.Path(torch.__file__).parent
        callers = []
        for package in ("distributed", "nn"):
            for path in sorted((root / package).rglob("*.py")):
                tree = ast.parse(path.read_text(), str(path))
                for fn in ast.walk(tree):
                    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        continue
                    for node in ast.walk(fn):
                        if (
                            isinstance(node, ast.Call)
                            and isinstance(node.func, ast.Attribute)
                            and node.func.attr in _CPP_COLLECTIVES
                            and ast.unparse(node.func.value)
                            in ("dist", "torch.distributed")
                            and fn.name != _CPP_COLLECTIVES[node.func.attr]
                        ):
                            where = path.relative_to(root.parent)
                            callers.append(f"{where}:{node.lineno} in {fn.name}")
        self.assertEqual(callers, [])


if __name__ == "__main__":
    run_tests()
