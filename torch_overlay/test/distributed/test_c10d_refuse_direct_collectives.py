# Owner(s): ["oncall: distributed"]
"""A thread may refuse collectives called directly on a ProcessGroup or Backend."""

import threading

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (
    _refuses_direct_collectives,
    _set_refuse_direct_collectives,
)
from torch.testing._internal.common_distributed import requires_gloo
from torch.testing._internal.common_utils import (
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
    TestCase,
)


_REFUSED = "refuses collectives called directly"


# Collective method calls on a group (g) and on its CPU backend (b), one per
# overload kind, on a tensor t.
_DIRECT_CALLS = {
    "pg_allreduce_tensors": lambda g, b, t: g.allreduce([t]),
    "pg_allreduce_tensor_op": lambda g, b, t: g.allreduce(t, dist.ReduceOp.SUM),
    "pg_broadcast_tensor_root": lambda g, b, t: g.broadcast(t, 0),
    "pg_allgather": lambda g, b, t: g.allgather([[torch.ones(2)]], [t]),
    "pg_allreduce_coalesced": lambda g, b, t: g.allreduce_coalesced([t]),
    "pg_reduce_tensor_root": lambda g, b, t: g.reduce(t, 0),
    "pg_barrier": lambda g, b, t: g.barrier(),
    "backend_allreduce": lambda g, b, t: b.allreduce([t]),
    "backend_broadcast": lambda g, b, t: b.broadcast([t]),
}


def _direct_call(group, name):
    """The call ``name`` of ``_DIRECT_CALLS`` on ``group``, to be made."""
    backend, t = group._get_backend(torch.device("cpu")), torch.ones(2)
    return lambda: _DIRECT_CALLS[name](group, backend, t)


@requires_gloo()
@instantiate_parametrized_tests
class RefuseDirectCollectivesTest(TestCase):
    def setUp(self):
        super().setUp()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.group = dist.group.WORLD

    def tearDown(self):
        _set_refuse_direct_collectives(False)
        dist.destroy_process_group()
        super().tearDown()

    def _count(self):
        return self.group._get_backend(
            torch.device("cpu")
        )._get_sequence_number_for_group()

    @parametrize("name", list(_DIRECT_CALLS))
    def test_refused_before_anything_is_issued(self, name):
        self.assertFalse(_refuses_direct_collectives())
        _set_refuse_direct_collectives(True)
        self.assertTrue(_refuses_direct_collectives())
        before = self._count()
        call = _direct_call(self.group, name)
        with self.assertRaisesRegex(RuntimeError, _REFUSED):
            call()
        self.assertEqual(self._count(), before)

    def test_allowed_again_once_the_flag_is_cleared(self):
        _set_refuse_direct_collectives(True)
        _set_refuse_direct_collectives(False)
        before = self._count()
        for name in _DIRECT_CALLS:
            _direct_call(self.group, name)().wait()
        self.assertEqual(self._count(), before + len(_DIRECT_CALLS))

    def test_the_flag_belongs_to_the_thread_that_sets_it(self):
        seen = {}

        def refusing_thread():
            seen["starts_refusing"] = _refuses_direct_collectives()
            _set_refuse_direct_collectives(True)
            try:
                self.group.allreduce([torch.ones(2)])
            except RuntimeError as error:
                seen["error"] = str(error)
            finally:
                _set_refuse_direct_collectives(False)

        _set_refuse_direct_collectives(True)
        thread = threading.Thread(target=refusing_thread)
        thread.start()
        thread.join(timeout=60)
        self.assertFalse(thread.is_alive())
        _set_refuse_direct_collectives(False)
        self.assertFalse(seen["starts_refusing"])
        self.assertIn(_REFUSED, seen["error"])
        # This thread cleared its own flag: its calls go out.
        self.group.allreduce([torch.ones(2)]).wait()

    def test_a_thread_that_refuses_does_not_stop_the_others(self):
        refusing, release = threading.Event(), threading.Event()

        def refusing_thread():
            _set_refuse_direct_collectives(True)
            refusing.set()
            release.wait(timeout=60)
            _set_refuse_direct_collectives(False)

        thread = threading.Thread(target=refusing_thread)
        thread.start()
        try:
            self.assertTrue(refusing.wait(timeout=60))
            before = self._count()
            for name in _DIRECT_CALLS:
                _direct_call(self.group, name)().wait()
            self.assertEqual(self._count(), before + len(_DIRECT_CALLS))
        finally:
            release.set()
            thread.join(timeout=60)
        self.assertFalse(thread.is_alive())

    def test_the_functions_of_torch_distributed_are_refused_too(self):
        # They end in the same methods; a thread that refuses direct calls
        # hands its collectives to someone else (its collective hook).
        _set_refuse_direct_collectives(True)
        with self.assertRaisesRegex(RuntimeError, _REFUSED):
            dist.all_reduce(torch.ones(2))


if __name__ == "__main__":
    run_tests()
