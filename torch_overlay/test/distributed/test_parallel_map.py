# Owner(s): ["oncall: distributed"]
"""torch.distributed.threading.parallel_map across real processes (gloo).

Every test runs ``fn`` bodies that call collectives on worker threads and
checks, on every rank, values that are only right if each rank paired the
same item's collectives with the other ranks', and that every rank issued
the same (item, call, op) sequence.
"""

import contextlib
import contextvars
import datetime
import functools
import importlib
import itertools
import os
import pkgutil
import random
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import unittest
from unittest import mock
import warnings

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.distributed_c10d import _collective_hook
from torch.distributed.threading import _pool, coordinated, item_generator, parallel_map
from torch.testing._internal.common_distributed import (
    MultiProcessTestCase,
    requires_gloo,
    requires_nccl,
    skip_if_lt_x_gpu,
)
from torch.testing._internal.common_utils import (
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
    TestCase,
)

from test_parallel_map_schedule import promised_order


@contextlib.contextmanager
def _recording_schedule():
    """Records (item, call, op) of every collective the schedule this thread
    coordinates issues, in the order the turn numbers the issues (under its
    lock, as each is issued).

    A nested call's coordinating thread hands its collectives to this one,
    which numbers them again: only this schedule's record is what the process
    group sees. A call made on this thread itself (in a coordinated function)
    issues its collectives directly: its record is part of this one.
    """
    from torch.distributed.threading import _turn

    issued = []
    coordinator = threading.get_ident()
    count = _turn.Turn._count

    def record(turn, call):
        if turn._coordinator == coordinator:
            issued.append((call.item, call.seq, call.name))
        count(turn, call)

    with mock.patch.object(_turn.Turn, "_count", record):
        yield issued


def _assert_no_busy_worker(test):
    # Worker threads may stay for the next call, idle in the pool; none may
    # still run an item. The caller's hook is not left set.
    test.assertIsNone(_collective_hook.fn)
    for _ in range(100):  # a thread whose idle time just ran out is exiting
        workers = [
            t for t in threading.enumerate() if t.name.startswith("parallel_map")
        ]
        if len(workers) == _pool.pool.idle_count():
            return
        time.sleep(0.05)
    test.fail(f"{len(workers)} worker threads, {_pool.pool.idle_count()} of them idle")


def _full(value, n=2):
    return torch.full((n,), float(value))


def _all_reduce_value(i, rank):
    t = _full(i + rank)
    dist.all_reduce(t)
    return t[0].item()


class _ParallelMapTestBase(MultiProcessTestCase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def _init(self, backend="gloo", timeout=None):
        store = dist.FileStore(self.file_name, self.world_size)
        dist.init_process_group(
            backend,
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            **({"timeout": timeout} if timeout else {}),
        )
        torch.set_num_threads(1)
        if sysconfig.get_config_var("Py_GIL_DISABLED"):
            self.assertFalse(
                sys._is_gil_enabled(), "free-threaded build with the GIL on"
            )
        warnings.simplefilter("ignore", FutureWarning)  # deprecated aliases under test

    def _assert_same_on_every_rank(self, value):
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        for rank, other in enumerate(gathered):
            self.assertEqual(other, value, f"rank {rank} differs from rank {self.rank}")

    def _assert_clean(self):
        _assert_no_busy_worker(self)


class _TestsForEveryWorldSize:
    """Mixed into each world size's class. A test with a parameter is a ``_check_``
    method here and a stub there: all values at 2 ranks, one at 4 (slow to start)."""

    @requires_gloo()
    def test_tensor_collectives(self):
        self._init()
        ws, r = self.world_size, self.rank
        rank_sum = ws * (ws - 1) // 2

        def item(i):
            v = i * 100 + r
            root = i % ws
            out = {}
            t = _full(v)
            dist.broadcast(t, src=root)
            out["broadcast"] = t
            t = _full(v)
            dist.all_reduce(t)
            out["all_reduce"] = t
            t = _full(v)
            dist.all_reduce(t, async_op=True).wait()
            out["all_reduce_async"] = t
            ts = [_full(v), _full(2 * v)]
            dist.all_reduce_coalesced(ts)
            out["all_reduce_coalesced"] = torch.cat(ts)
            t = _full(v)
            dist.reduce(t, dst=root)
            if r == root:
                out["reduce"] = t
            ts = [_full(-1) for _ in range(ws)]
            dist.all_gather(ts, _full(v))
            out["all_gather"] = torch.cat(ts)
            t = _full(-1, 2 * ws)
            dist.all_gather_into_tensor(t, _full(v))
            out["all_gather_into_tensor"] = t
            lists = [[_full(-1)] for _ in range(ws)]
            dist.all_gather_coalesced(lists, [_full(v)])
            out["all_gather_coalesced"] = torch.cat([x[0] for x in lists])
            gathered = [_full(-1) for _ in range(ws)] if r == root else None
            dist.gather(_full(v), gathered, dst=root)
            if r == root:
                out["gather"] = torch.cat(gathered)
            t = _full(-1)
            pieces = [_full(i * 100 + q * 10) for q in range(ws)] if r == root else None
            dist.scatter(t, pieces, src=root)
            out["scatter"] = t
            t = _full(-1)
            dist.reduce_scatter(t, [_full(v + q) for q in range(ws)])
            out["reduce_scatter"] = t
            t = _full(-1)
            dist.reduce_scatter_tensor(t, torch.cat([_full(v + q) for q in range(ws)]))
            out["reduce_scatter_tensor"] = t
            ts = [_full(-1) for _ in range(ws)]
            dist.all_to_all(ts, [_full(1000 * i + 10 * r + q) for q in range(ws)])
            out["all_to_all"] = torch.cat(ts)
            t = _full(-1, 2 * ws)
            dist.all_to_all_single(
                t, torch.cat([_full(1000 * i + 10 * r + q) for q in range(ws)])
            )
            out["all_to_all_single"] = t
            dist.barrier()
            dist.barrier(async_op=True).wait()
            dist.monitored_barrier()
            return out

        items = range(7)
        with _recording_schedule() as issued:
            results = parallel_map(item, items, max_workers=3)
        for i, out in zip(items, results, strict=True):
            total = ws * i * 100 + rank_sum
            per_rank = torch.cat([_full(i * 100 + q) for q in range(ws)])
            exchange = torch.cat([_full(1000 * i + 10 * q + r) for q in range(ws)])
            expected = {
                "broadcast": _full(i * 100 + i % ws),
                "all_reduce": _full(total),
                "all_reduce_async": _full(total),
                "all_reduce_coalesced": torch.cat([_full(total), _full(2 * total)]),
                "all_gather": per_rank,
                "all_gather_into_tensor": per_rank,
                "all_gather_coalesced": per_rank,
                "scatter": _full(i * 100 + r * 10),
                "reduce_scatter": _full(total + ws * r),
                "reduce_scatter_tensor": _full(total + ws * r),
                "all_to_all": exchange,
                "all_to_all_single": exchange,
            }
            if r == i % ws:
                expected["reduce"] = _full(total)
                expected["gather"] = per_rank
            self.assertEqual(out, expected, f"item {i}")
        self.assertEqual(len(issued), 17 * len(items))
        self._assert_same_on_every_rank(issued)
        self._assert_clean()

    @requires_gloo()
    @unittest.skipUnless(hasattr(os, "sched_setaffinity"), "needs sched_setaffinity")
    def test_default_max_workers_is_the_same_on_every_rank(self):
        # The schedule depends on max_workers, so its default must not depend
        # on what differs between ranks: here the ranks per machine that
        # torchrun reports and the CPUs this process may use.
        self._init()
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[: max(1, len(cpus) // (self.rank + 1))])
        with mock.patch.dict(os.environ, {"LOCAL_WORLD_SIZE": str(self.rank + 1)}):

            def item(i):
                t = _full(i * 10 + self.rank)
                dist.all_reduce(t)
                u = _full(t[0].item() * (self.rank + 1))
                dist.all_reduce(u)
                return t[0].item(), u[0].item()

            expected = [item(i) for i in range(6)]
            self.assertEqual(parallel_map(item, range(6)), expected)
            self._assert_clean()

    def _check_data_dependent_counts_under_random_delays(self, max_workers):
        self._init()
        ws, r = self.world_size, self.rank
        # Different on every rank, so thread timing differs between ranks.
        rng = random.Random(1234 + r)
        delays = [[rng.random() * 0.003 for _ in range(5)] for _ in range(12)]

        def item(i):
            count = (i * 7) % 5  # 0 to 4 collectives, depending on the item
            acc = []
            for k in range(count):
                time.sleep(delays[i][k])
                t = _full(i * 10 + k + r)
                if k % 2:
                    dist.all_reduce(t, async_op=True).wait()
                else:
                    dist.all_reduce(t)
                acc.append(t[0].item())
            return acc

        expected = [
            [float(ws * (i * 10 + k) + ws * (ws - 1) // 2) for k in range((i * 7) % 5)]
            for i in range(12)
        ]
        with _recording_schedule() as issued:
            results = parallel_map(item, range(12), max_workers=max_workers)
        self.assertEqual(results, expected)
        self._assert_same_on_every_rank(issued)
        if max_workers > 1:  # 1 runs the loop on the caller, with no schedule
            self.assertEqual(
                [(i, c) for i, c, _ in issued],
                promised_order([len(x) for x in expected], max_workers),
            )
        self._assert_clean()

    def _check_coalesced_all_reduces_under_random_delays(self, max_workers):
        self._init()
        ws, r = self.world_size, self.rank
        rng = random.Random(4321 + r)
        delays = [[rng.random() * 0.002 for _ in range(4)] for _ in range(10)]
        kinds = [  # dtype, shape and op of a call; the last one is too big to coalesce
            (torch.float32, (2,), dist.ReduceOp.SUM),
            (torch.float64, (3, 1), dist.ReduceOp.SUM),
            (torch.int64, (4,), dist.ReduceOp.MAX),
            (torch.float32, (1,), dist.ReduceOp.SUM),
            (torch.float32, (20_000,), dist.ReduceOp.SUM),
        ]

        def expected(i, k):
            dtype, shape, op = kinds[(i * 3 + k) % len(kinds)]
            base = i * 10 + k
            value = (
                base + ws - 1
                if op == dist.ReduceOp.MAX
                else ws * base + ws * (ws - 1) // 2
            )
            return torch.full(shape, value, dtype=dtype)

        def item(i):
            out = []
            for k in range(i % 4 + 1):
                time.sleep(delays[i][k])
                dtype, shape, op = kinds[(i * 3 + k) % len(kinds)]
                t = torch.full(shape, i * 10 + k + r, dtype=dtype)
                dist.all_reduce(t, op=op)
                out.append(t)
            return out

        group = dist.distributed_c10d._get_default_group()
        calls = sum(i % 4 + 1 for i in range(10))
        with _recording_schedule() as issued:
            before = group._get_sequence_number_for_group()
            results = parallel_map(
                item, range(10), max_workers=max_workers, coalesce_all_reduces=True
            )
            collectives = group._get_sequence_number_for_group() - before
        for i, out in enumerate(results):
            self.assertEqual(out, [expected(i, k) for k in range(i % 4 + 1)])
        self.assertEqual(len(issued), calls)
        self.assertLess(collectives, calls)
        self._assert_same_on_every_rank((issued, collectives))
        self._assert_clean()


@instantiate_parametrized_tests
class ParallelMapTest(_TestsForEveryWorldSize, _ParallelMapTestBase):
    @property
    def world_size(self):
        return 2

    @requires_gloo()
    @parametrize("max_workers", [1, 2, 3, 16])
    def test_data_dependent_counts_under_random_delays(self, max_workers):
        self._check_data_dependent_counts_under_random_delays(max_workers)

    @requires_gloo()
    @parametrize("max_workers", [2, 3, 8])
    def test_coalesced_all_reduces_under_random_delays(self, max_workers):
        self._check_coalesced_all_reduces_under_random_delays(max_workers)

    @requires_gloo()
    def test_point_to_point(self):
        self._init()
        r = self.rank
        peer = 1 - r

        def item(i):
            out = {}
            buf = _full(-1)
            if r == 0:
                dist.send(_full(i * 10 + r), dst=peer)
                out["recv_from"] = dist.recv(buf)  # any source
            else:
                out["recv_from"] = dist.recv(buf, src=peer)
                dist.send(_full(i * 10 + r), dst=peer)
            out["recv"] = buf
            buf = _full(-1)
            works = [dist.isend(_full(i * 10 + r), dst=peer), dist.irecv(buf, src=peer)]
            for work in works:
                work.wait()
            out["irecv"] = buf
            buf = _full(-1)
            ops = [
                dist.P2POp(dist.isend, _full(i * 100 + r), peer),
                dist.P2POp(dist.irecv, buf, peer),
            ]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            out["batch"] = buf
            return out

        with _recording_schedule() as issued:
            results = parallel_map(item, range(6), max_workers=3)
        for i, out in enumerate(results):
            self.assertEqual(
                out,
                {
                    "recv_from": peer,
                    "recv": _full(i * 10 + peer),
                    "irecv": _full(i * 10 + peer),
                    "batch": _full(i * 100 + peer),
                },
            )
        self._assert_same_on_every_rank([(i, c) for i, c, _ in issued])
        self._assert_clean()

    @requires_gloo()
    def test_object_collectives(self):
        self._init()
        ws, r = self.world_size, self.rank

        def item(i):
            root = i % ws
            out = {}
            gathered = [None] * ws
            dist.all_gather_object(gathered, {"item": i, "rank": r})
            out["all_gather_object"] = gathered
            gathered = [None] * ws if r == root else None
            dist.gather_object(("g", i, r), gathered, dst=root)
            if r == root:
                out["gather_object"] = gathered
            objs = [("b", i)] if r == root else [None]
            dist.broadcast_object_list(objs, src=root)
            out["broadcast_object_list"] = objs
            received = [None]
            dist.scatter_object_list(
                received,
                [("s", i, q) for q in range(ws)] if r == root else None,
                src=root,
            )
            out["scatter_object_list"] = received
            if r == root:
                dist.send_object_list([("p2p", i)], dst=(root + 1) % ws)
            elif r == (root + 1) % ws:
                box = [None]
                dist.recv_object_list(box, src=root)
                out["recv_object_list"] = box
            return out

        with _recording_schedule() as issued:
            results = parallel_map(item, range(5), max_workers=2)
        for i, out in enumerate(results):
            root = i % ws
            expected = {
                "all_gather_object": [{"item": i, "rank": q} for q in range(ws)],
                "broadcast_object_list": [("b", i)],
                "scatter_object_list": [("s", i, r)],
            }
            if r == root:
                expected["gather_object"] = [("g", i, q) for q in range(ws)]
            if r == (root + 1) % ws:
                expected["recv_object_list"] = [("p2p", i)]
            self.assertEqual(out, expected, f"item {i}")
        # send/recv_object_list run on one rank or the other: compare the rest.
        shared = [
            (i, op)
            for i, _, op in issued
            if not op.endswith("object_list")
            or op in ("broadcast_object_list", "scatter_object_list")
        ]
        self._assert_same_on_every_rank(shared)
        self._assert_clean()

    @requires_gloo()
    def test_group_creation(self):
        self._init()
        ws, r = self.world_size, self.rank
        try:
            dist.split_group(split_ranks=[[q] for q in range(ws)])
        except RuntimeError as e:
            serial_error = str(e)
        else:
            serial_error = None

        def item(i):
            group = dist.new_group(list(range(ws)))
            t = _full(i + r)
            dist.all_reduce(t, group=group)
            mine, _ = dist.new_subgroups(group_size=1)
            alone = _full(i * 10 + r)
            dist.all_reduce(alone, group=mine)
            try:
                dist.split_group(split_ranks=[[q] for q in range(ws)])
                split_error = None
            except RuntimeError as e:
                split_error = str(e)
            return t, alone, split_error

        results = parallel_map(item, range(4), max_workers=2)
        for i, (t, alone, split_error) in enumerate(results):
            self.assertEqual(t, _full(ws * i + ws * (ws - 1) // 2))
            self.assertEqual(alone, _full(i * 10 + r))
            self.assertEqual(split_error, serial_error)
        self._assert_clean()

    @requires_gloo()
    def test_functional_collectives_and_dtensor(self):
        self._init()
        ws, r = self.world_size, self.rank
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import distribute_tensor, Replicate, Shard

        mesh = init_device_mesh("cpu", (ws,))
        world = dist.group.WORLD

        def item(i):
            v = i * 100 + r
            out = {
                "all_reduce": funcol.all_reduce(_full(v), "sum", world),
                "broadcast": funcol.broadcast(_full(v), i % ws, world),
                "all_gather": funcol.all_gather_tensor(_full(v), 0, world),
                "reduce_scatter": funcol.reduce_scatter_tensor(
                    torch.cat([_full(v + q) for q in range(ws)]), "sum", 0, world
                ),
                "all_to_all": funcol.all_to_all_single(
                    torch.cat([_full(1000 * i + 10 * r + q) for q in range(ws)]),
                    None,
                    None,
                    world,
                ),
                "coalesced": torch.cat(
                    funcol.all_reduce_coalesced([_full(v), _full(v)], "sum", world)
                ),
            }
            x = torch.arange(4 * ws, dtype=torch.float32) + i  # same on every rank
            d = distribute_tensor(x, mesh, [Shard(0)])
            out["dtensor_replicate"] = (
                (d * 2).redistribute(mesh, [Replicate()]).to_local()
            )
            out["dtensor_sum"] = d.sum().full_tensor()
            return {k: torch.as_tensor(v).clone() for k, v in out.items()}

        results = parallel_map(item, range(5), max_workers=3)
        for i, out in enumerate(results):
            total = ws * i * 100 + ws * (ws - 1) // 2
            x = torch.arange(4 * ws, dtype=torch.float32) + i
            self.assertEqual(
                out,
                {
                    "all_reduce": _full(total),
                    "broadcast": _full(i * 100 + i % ws),
                    "all_gather": torch.cat([_full(i * 100 + q) for q in range(ws)]),
                    "reduce_scatter": _full(total + ws * r),
                    "all_to_all": torch.cat(
                        [_full(1000 * i + 10 * q + r) for q in range(ws)]
                    ),
                    "coalesced": torch.cat([_full(total), _full(total)]),
                    "dtensor_replicate": x * 2,
                    "dtensor_sum": x.sum(),
                },
                f"item {i}",
            )
        self._assert_clean()

    @requires_gloo()
    def test_collectives_run_under_the_items_modes(self):
        # A mode the caller entered sees every collective of the items once,
        # whoever issues it, and a functional collective under an item's
        # no_grad gives a tensor that does not require grad, as serially.
        self._init()
        from torch.distributed.tensor.debug import CommDebugMode

        r = self.rank
        world = dist.group.WORLD
        rng = random.Random(99 + r)
        delays = [rng.random() * 0.004 for _ in range(10)]

        def item(i):
            for k in range(4):
                time.sleep(delays[i] * (k % 2))
                t = _full(i + r)
                if k % 2:
                    dist.all_reduce(t, async_op=True).wait()
                else:
                    dist.all_reduce(t)
            x = _full(i + r).requires_grad_()
            with torch.no_grad():
                y = funcol.all_reduce(x, "sum", world)
                return y.requires_grad, y.numpy().tolist()

        with CommDebugMode() as comm:
            results = parallel_map(item, range(10), max_workers=3)
        self.assertEqual(results, [(False, [2.0 * i + 1] * 2) for i in range(10)])
        self.assertEqual(comm.get_total_counts(), 10 * 5)
        self._assert_clean()

    @requires_gloo()
    def test_coalescing_keeps_process_groups_apart(self):
        # All-reduces alternate between the world group and a group of this
        # rank alone: only calls of the same group may share a collective.
        self._init()
        ws, r = self.world_size, self.rank
        mine, _ = dist.new_subgroups(group_size=1)
        rng = random.Random(7 + r)
        delays = [rng.random() * 0.002 for _ in range(8)]

        def item(i):
            out = []
            for k in range(4):
                time.sleep(delays[i] * (k % 2))
                t = _full(i * 10 + k + r)
                dist.all_reduce(t, group=mine if (i + k) % 2 else None)
                out.append(t[0].item())
            return out

        results = parallel_map(item, range(8), max_workers=4, coalesce_all_reduces=True)
        expected = [
            [
                i * 10 + k + r
                if (i + k) % 2
                else ws * (i * 10 + k) + ws * (ws - 1) // 2
                for k in range(4)
            ]
            for i in range(8)
        ]
        self.assertEqual(results, expected)
        self._assert_clean()

    @requires_gloo()
    def test_ddp_construction_is_scheduled(self):
        # DDP's construction checks shapes and broadcasts rank 0's parameters
        # (C++ collectives, reached through the hooked torch.distributed.utils).
        self._init()
        r = self.rank
        rng = random.Random(7 + r)
        delays = [rng.random() * 0.004 for _ in range(12)]

        def item(i):
            time.sleep(delays[i])
            linear = torch.nn.Linear(2, 2)
            with torch.no_grad():
                linear.weight.fill_(10 * r + i)
            model = torch.nn.parallel.DistributedDataParallel(linear)
            return model.module.weight[0, 0].item(), _all_reduce_value(i, r)

        results = parallel_map(item, range(12), max_workers=4)
        self.assertEqual(results, [(float(i), 2.0 * i + 1) for i in range(12)])
        self._assert_clean()

    @requires_gloo()
    def test_ddp_forward_broadcast_is_scheduled(self):
        # A DDP model per item, built outside parallel_map (one shared by items
        # would be a race of its own: whether a forward broadcasts depends on
        # the forwards before it). Forward broadcasts rank 0's buffers.
        self._init()
        r = self.rank
        rng = random.Random(11 + r)
        delays = [rng.random() * 0.004 for _ in range(12)]

        def models():
            built = []
            for _ in range(12):
                model = torch.nn.parallel.DistributedDataParallel(
                    torch.nn.BatchNorm1d(2)
                )
                model.eval()
                with torch.no_grad():
                    model.module.running_mean.fill_(r + 1)
                built.append(model)
            return built

        def run(map_fn):
            built = models()

            def item(i):
                time.sleep(delays[i])
                with torch.no_grad():
                    built[i](torch.zeros(4, 2))
                return built[i].module.running_mean[0].item(), _all_reduce_value(i, r)

            issued = dist.group.WORLD._get_sequence_number_for_group()
            results = map_fn(item)
            return results, dist.group.WORLD._get_sequence_number_for_group() - issued

        serial, serial_count = run(lambda item: [item(i) for i in range(12)])
        mapped, count = run(lambda item: parallel_map(item, range(12), max_workers=4))
        self.assertEqual(serial, [(1.0, 2.0 * i + 1) for i in range(12)])
        self.assertEqual(mapped, serial)
        self.assertGreater(serial_count, 12)  # the broadcasts happened
        self.assertEqual(count, serial_count)
        self._assert_clean()

    @parametrize("failing, max_workers", [(0, 2), (3, 2), (5, 3), (2, 8)])
    @requires_gloo()
    def test_symmetric_failure(self, failing, max_workers):
        self._init()
        ws = self.world_size

        def item(i):
            t = _full(i)
            dist.all_reduce(t)
            if i == failing:
                raise ValueError(f"item {i} failed")
            dist.all_reduce(t)
            return t[0].item()

        with (
            _recording_schedule() as issued,
            self.assertRaisesRegex(ValueError, f"item {failing} failed") as caught,
        ):
            parallel_map(item, range(8), max_workers=max_workers)
        self._assert_same_on_every_rank((str(caught.exception), issued))
        # No item entered a slot after the failure: at most the failing
        # item's slot-mates (the max_workers - 1 items after it) issued.
        self.assertLess(max(i for i, _, _ in issued), failing + max_workers)
        # The process group is still in step: a later collective matches.
        t = _full(self.rank + failing)
        dist.all_reduce(t)
        self.assertEqual(t, _full(ws * failing + ws * (ws - 1) // 2))
        self._assert_clean()

    @requires_gloo()
    def test_collective_error_raises_in_the_worker(self):
        self._init()
        ws = self.world_size
        try:
            dist.broadcast(_full(0), src=ws + 5)
        except (RuntimeError, ValueError) as e:
            serial = (type(e), str(e))

        def item(i):
            try:
                dist.broadcast(_full(0), src=ws + 5)
            except (RuntimeError, ValueError) as e:
                caught = (type(e), str(e), threading.current_thread().name)
            t = _full(i)
            dist.all_reduce(t)  # the schedule goes on
            return caught, t

        results = parallel_map(item, range(4), max_workers=2)
        for i, ((kind, message, thread), t) in enumerate(results):
            self.assertEqual((kind, message), serial)
            self.assertTrue(thread.startswith("parallel_map-worker"), thread)
            self.assertEqual(t, _full(ws * i))
        self._assert_clean()

    @requires_gloo()
    def test_nested_parallel_map(self):
        self._init()
        ws, r = self.world_size, self.rank

        def inner(j):
            t = _full(j + r)
            dist.all_reduce(t)
            return t[0].item()

        def outer(i):
            t = _full(i * 100 + r)
            dist.all_reduce(t)
            return t[0].item(), parallel_map(inner, range(i, i + 3), max_workers=2)

        with _recording_schedule() as issued:
            results = parallel_map(outer, range(4), max_workers=2)
        for i, (mine, nested) in enumerate(results):
            self.assertEqual(mine, ws * i * 100 + ws * (ws - 1) // 2)
            self.assertEqual(
                nested, [ws * j + ws * (ws - 1) // 2 for j in range(i, i + 3)]
            )
        self._assert_same_on_every_rank(issued)
        self._assert_clean()

    @requires_gloo()
    def test_schedule_check(self):
        self._init()
        r = self.rank

        def same(i):
            return _all_reduce_value(i, r)

        def differs_on_rank_1(i):
            if i == 1 and r == 1:
                t = _full(i)
                dist.broadcast(t, src=0)
                return t[0].item()
            return _all_reduce_value(i, r)

        # Agreeing schedules pass, explicitly and through TORCH_DISTRIBUTED_DEBUG=DETAIL.
        expected = [2 * i + 1 for i in range(4)]
        self.assertEqual(
            parallel_map(same, range(4), max_workers=2, check_schedule=True), expected
        )
        dist.set_debug_level(dist.DebugLevel.DETAIL)
        try:
            with self.assertRaisesRegex(
                RuntimeError, r"max_workers=2; rank 1: max_workers=3"
            ):
                parallel_map(same, range(4), max_workers=2 + r)
        finally:
            dist.set_debug_level(dist.DebugLevel.OFF)
        with self.assertRaisesRegex(
            RuntimeError,
            r"rank 0: item 1 call 0: all_reduce \(tensor \[2\] torch.float32\); "
            r"rank 1: item 1 call 0: broadcast",
        ):
            parallel_map(
                differs_on_rank_1, range(4), max_workers=2, check_schedule=True
            )
        self._assert_clean()

    @parametrize(
        "other_items, other_max_workers",
        [(range(4), 2), (range(3), 1), ([5], 4)],
        name_fn=lambda items, max_workers: f"{len(items)}_items_{max_workers}_workers",
    )
    @requires_gloo()
    def test_refused_call_does_not_disturb_the_running_one(
        self, other_items, other_max_workers
    ):
        # Both calls check the schedule (as TORCH_DISTRIBUTED_DEBUG=DETAIL
        # would have them), and only rank 0 makes the second call: its
        # exchange with the other ranks must not happen, or it would pair
        # with the running call's checks and break that call on both ranks.
        self._init(timeout=datetime.timedelta(seconds=20))
        r = self.rank
        inside, release = threading.Event(), threading.Event()
        refused = []

        def item(i):
            if i == 0:
                inside.set()
                release.wait(timeout=30)
            return _all_reduce_value(i, r)

        def other_thread():
            inside.wait(timeout=30)
            try:
                # also with one worker or one item, which need no thread
                parallel_map(
                    lambda i: _all_reduce_value(i, r),
                    other_items,
                    max_workers=other_max_workers,
                    check_schedule=True,
                )
            except RuntimeError as e:
                refused.append(str(e))
            finally:
                release.set()

        t = threading.Thread(target=other_thread if r == 0 else release.set)
        t.start()
        results = parallel_map(item, range(6), max_workers=2, check_schedule=True)
        t.join()
        if r == 0:
            self.assertEqual(len(refused), 1)
            self.assertIn("already running on another thread", refused[0])
        self.assertEqual(results, [2.0 * i + 1 for i in range(6)])
        self._assert_clean()

    @parametrize("max_workers", [2, 1])
    @requires_gloo()
    def test_schedule_check_compares_item_counts(self, max_workers):
        # Rank 0 has one item, rank 1 two: the check must say so, with one
        # worker or several, instead of letting both ranks time out.
        self._init(timeout=datetime.timedelta(seconds=20))
        r = self.rank
        with self.assertRaisesRegex(RuntimeError, "schedules differ between ranks"):
            parallel_map(
                lambda i: _all_reduce_value(i, r),
                range(1 + r),
                max_workers=max_workers,
                check_schedule=True,
            )
        self._assert_clean()

    @requires_gloo()
    def test_item_generators_agree_across_ranks(self):
        # LayerDrop-like items: their own random draws decide which
        # collectives they issue. Per-rank delays differ; with item_generator
        # every rank draws the same per item, so the schedules agree (checked).
        self._init()
        ws, r = self.world_size, self.rank
        torch.manual_seed(77)  # as on every rank
        rng = random.Random(5 + r)
        delays = [rng.random() * 0.003 for _ in range(8)]

        def item(i):
            g = item_generator()
            out = []
            for k in range(4):
                if torch.rand((), generator=g) > 0.5:
                    time.sleep(delays[i])
                    t = _full(i * 10 + k + r)
                    dist.all_reduce(t)
                    out.append((k, t[0].item()))
            return out

        with _recording_schedule() as issued:
            results = parallel_map(item, range(8), max_workers=3, check_schedule=True)
        for i, out in enumerate(results):
            for k, value in out:
                self.assertEqual(value, ws * (i * 10 + k) + ws * (ws - 1) // 2)
        self.assertGreater(len({len(out) for out in results}), 1)
        self._assert_same_on_every_rank((results, issued))
        self._assert_clean()

    @requires_gloo()
    def test_item_generators_depend_on_neither_workers_nor_timing(self):
        # Without collectives in the items, ranks may use different
        # max_workers: the draws still agree, item by item, nested items
        # included; so they depend only on the call's and the item's place.
        self._init()
        r = self.rank
        torch.manual_seed(1234)  # as on every rank
        rng = random.Random(11 + r)
        delays = [rng.choice([0.0, 0.001, 0.003]) for _ in range(10)]

        def inner(j):
            return torch.rand(3, generator=item_generator()).tolist()

        def item(i):
            g = item_generator()
            self.assertIs(item_generator("cpu"), g)  # one per item and device
            time.sleep(delays[i])
            first = torch.rand(3, generator=g).tolist()
            torch.rand(5)  # the shared default generator: no effect on the items'
            # two nested calls in some items: their items draw their own numbers
            nested = []
            if i % 3 == 0:
                for _ in range(2):
                    nested += parallel_map(inner, range(2), max_workers=2)
            return first, nested

        results = parallel_map(item, range(10), max_workers=(2, 3)[r % 2])
        self._assert_same_on_every_rank(results)
        draws = [tuple(first) for first, _ in results]
        draws += [tuple(d) for _, nested in results for d in nested]
        self.assertEqual(len(draws), 10 + 4 * 4)
        self.assertEqual(len(set(draws)), len(draws))  # no two items draw alike
        # The next call of this process is another place: other numbers.
        again = parallel_map(item, range(10), max_workers=2)
        self.assertNotEqual([first for first, _ in again], [f for f, _ in results])
        # Outside parallel_map: the default generator, as without generator=.
        self.assertIs(item_generator(), torch.default_generator)
        self._assert_clean()

    @requires_gloo()
    def test_iterable_that_calls_collectives(self):
        # A sampler that broadcasts each index from rank 0: the iterable runs
        # on the calling thread at fixed points of the schedule, so its
        # broadcasts pair up across ranks, and the bypass detector counts
        # them as the schedule's.
        self._init()
        ws, r = self.world_size, self.rank

        def sampler():
            for i in range(7):
                t = _full(i * 10 if r == 0 else -1)
                dist.broadcast(t, src=0)
                yield int(t[0].item())

        with _recording_schedule() as issued:
            results = parallel_map(
                lambda x: _all_reduce_value(x, r), sampler(), max_workers=3
            )
        self.assertEqual(results, [ws * i * 10 + ws * (ws - 1) // 2 for i in range(7)])
        self._assert_same_on_every_rank(issued)
        self._assert_clean()

    @requires_gloo()
    def test_iterable_is_advanced_while_items_run(self):
        # As in the loop, the iterable is advanced on the calling thread while
        # items run: item i is pulled once i + 1 - 2 * max_workers items have
        # ended, and before more than max(max_workers, i + 1 - max_workers)
        # have (only items in slots can end). What the iterable raises fails
        # that index after the items before it ran.
        self._init()
        r, max_workers = self.rank, 2
        lock = threading.Lock()
        ended = []
        ended_at_pull = []
        pulled_on = set()

        def items():
            for i in range(12):
                with lock:
                    ended_at_pull.append(len(ended))
                pulled_on.add(threading.get_ident())
                yield i
            raise ValueError("the iterable failed after 12 items")

        def fn(i):
            value = _all_reduce_value(i, r)
            with lock:
                ended.append(i)
            return value

        with self.assertRaisesRegex(ValueError, "after 12 items"):
            parallel_map(fn, items(), max_workers=max_workers)
        for index, count in enumerate(ended_at_pull):
            self.assertGreaterEqual(
                count, index + 1 - 2 * max_workers, f"item {index} pulled too early"
            )
            self.assertLessEqual(
                count,
                max(max_workers, index + 1 - max_workers),
                f"item {index} pulled too late",
            )
        self.assertEqual(pulled_on, {threading.get_ident()})
        self.assertEqual(sorted(ended), list(range(12)))
        self._assert_clean()

    def _item_of_several_iterables(self, i, label, scale=1):
        t = _full(i * 10 + self.rank)
        dist.all_reduce(t)
        return label, t[0].item() * scale

    def _serial_of_several_iterables(self, i, label, scale=1):
        ws = self.world_size
        return label, (ws * i * 10 + ws * (ws - 1) // 2) * scale

    @parametrize("max_workers", [1, 2, 3])
    @requires_gloo()
    def test_several_iterables_as_map(self, max_workers):
        self._init()
        item, serial = (
            self._item_of_several_iterables,
            self._serial_of_several_iterables,
        )
        scales = [3, 1, 4, 1, 5]
        # As map(): fn gets one argument per iterable, the items stop at the
        # shortest iterable, an endless one is fine, and each iterator is
        # advanced exactly as far as map advances it.
        labels, serial_labels = iter("abcdefgh"), iter("abcdefgh")
        with _recording_schedule() as issued:
            results = parallel_map(
                item, itertools.count(), labels, scales, max_workers=max_workers
            )
        self.assertEqual(
            results, list(map(serial, itertools.count(), serial_labels, scales))
        )
        self.assertEqual(list(labels), list(serial_labels))
        # one all_reduce per item; one worker runs the loop, with no schedule
        self.assertEqual(len(issued), 0 if max_workers == 1 else len(scales))
        self._assert_same_on_every_rank(issued)
        self.assertEqual(
            parallel_map(item, [7], "z", max_workers=max_workers), [serial(7, "z")]
        )
        self.assertEqual(parallel_map(item, [], "z", max_workers=max_workers), [])
        self._assert_clean()

    @requires_gloo()
    def test_several_iterables_strict_and_multi_apply(self):
        self._init()
        ws, r = self.world_size, self.rank
        item, serial = (
            self._item_of_several_iterables,
            self._serial_of_several_iterables,
        )

        # The multi_apply recipe of the docs: keyword arguments through partial,
        # one list per output.
        def multi_apply(func, *lists, **kwargs):
            results = parallel_map(
                functools.partial(func, **kwargs), *lists, max_workers=2
            )
            return tuple(map(list, zip(*results, strict=True)))

        out_labels, values = multi_apply(item, range(5), "vwxyz", scale=2)
        self.assertEqual(out_labels, list("vwxyz"))
        self.assertEqual(values, [serial(i, "", 2)[1] for i in range(5)])

        # strict=True: equal lengths pass; a shorter iterable raises zip's
        # ValueError in place of its first missing item, after the items before it.
        self.assertEqual(
            parallel_map(item, range(3), "abc", max_workers=2, strict=True),
            [serial(i, c) for i, c in zip(range(3), "abc", strict=True)],
        )
        done = []

        def recording(i, label):
            done.append(i)
            return item(i, label)

        with self.assertRaisesRegex(
            ValueError, "argument 2 is shorter than argument 1"
        ):
            parallel_map(recording, range(6), "abcd", max_workers=2, strict=True)
        self.assertEqual(sorted(done), [0, 1, 2, 3])
        t = _full(r)  # the ranks are still in step
        dist.all_reduce(t)
        self.assertEqual(t, _full(ws * (ws - 1) // 2))
        with self.assertRaisesRegex(TypeError, "'int' object is not iterable"):
            parallel_map(item, range(3), 5, max_workers=2)
        self._assert_clean()

    @requires_gloo()
    def test_coordinated(self):
        self._init()
        order = []

        @coordinated
        def log_step(i):
            order.append((i, threading.current_thread() is threading.main_thread()))
            return i

        def item(i):
            t = _full(i)
            dist.all_reduce(t)
            return log_step(i)

        self.assertEqual(parallel_map(item, range(6), max_workers=3), list(range(6)))
        self.assertTrue(all(on_main for _, on_main in order))
        self._assert_same_on_every_rank(order)
        self._assert_clean()

    @requires_gloo()
    def test_coordinated_in_a_nested_call_reaches_the_outermost_schedule(self):
        # Called in an item of a nested call, a coordinated function runs on
        # the outermost coordinating thread, one at a time, at its item's
        # place in the schedule, so its own collective pairs up across ranks
        # and the order is the same on every rank under per-rank delays.
        self._init()
        ws, r = self.world_size, self.rank
        rng = random.Random(77 + r)
        delays = {(i, j): rng.choice([0.0, 0.002]) for i in range(3) for j in range(4)}
        order, running = [], []

        @coordinated
        def step(i, j):
            # Records, not asserts: an item failing on one rank only would
            # leave the other rank waiting in a collective.
            running.append((i, j))
            overlapped = len(running) > 1
            t = _full(10 * i + j + r)
            dist.all_reduce(t)  # issued by the outermost coordinating thread
            on_main = threading.current_thread() is threading.main_thread()
            order.append((i, j, on_main, overlapped))
            running.pop()
            return t[0].item()

        def inner(i, j):
            time.sleep(delays[(i, j)])
            return step(i, j)

        def outer(i):
            return parallel_map(lambda j: inner(i, j), range(4), max_workers=2)

        results = parallel_map(outer, range(3), max_workers=3)
        expected = [
            [ws * (10 * i + j) + ws * (ws - 1) // 2 for j in range(4)] for i in range(3)
        ]
        self.assertEqual(results, expected)
        self.assertEqual(len(order), 12)
        self.assertTrue(
            all(on_main and not overlapped for *_, on_main, overlapped in order), order
        )
        self._assert_same_on_every_rank(order)
        self._assert_clean()

    @requires_gloo()
    def test_parallel_map_inside_a_coordinated_function(self):
        # A coordinated function runs on the coordinating thread while the
        # schedule waits for it; a parallel_map there runs a schedule of its
        # own, whose items' collectives pair up across ranks too, and leaves
        # the process's top level to the outer call (a call from another
        # thread, made after the inner call returned, is refused).
        self._init()
        ws, r = self.world_size, self.rank
        rng = random.Random(3 + r)
        delays = [rng.random() * 0.002 for _ in range(4)]

        def call_from_another_thread():
            refusals = []

            def call():
                try:
                    parallel_map(abs, [-1, -2], max_workers=2)
                except RuntimeError as e:
                    refusals.append(str(e))

            thread = threading.Thread(target=call, daemon=True)
            thread.start()
            thread.join(60)
            return refusals

        @coordinated
        def summary(i):
            inner = parallel_map(
                lambda j: _all_reduce_value(10 * i + j, r), range(3), max_workers=2
            )
            return inner, call_from_another_thread()

        def item(i):
            time.sleep(delays[i])
            return _all_reduce_value(100 * i + 1000, r), summary(i)

        with _recording_schedule() as issued:
            results = parallel_map(item, range(4), max_workers=2)
        total = ws * (ws - 1) // 2
        for i, (outer, (inner, refusals)) in enumerate(results):
            self.assertEqual(outer, ws * (100 * i + 1000) + total)
            self.assertEqual(inner, [ws * (10 * i + j) + total for j in range(3)])
            self.assertEqual(len(refusals), 1, refusals)
            self.assertIn("already running on another thread", refusals[0])
        # per item: its all_reduce, the coordinated call, and the inner
        # call's three (that call's coordinating thread is this one too)
        self.assertEqual(len(issued), 4 * (2 + 3))
        self._assert_same_on_every_rank(issued)
        self._assert_clean()


@unittest.skipUnless(torch.cuda.is_available(), "needs CUDA")
class ParallelMapCudaTest(_ParallelMapTestBase):
    """Collectives are issued on the stream the worker had current."""

    @property
    def world_size(self):
        return 2

    def _check_issued_on_worker_stream(self, backend):
        r = self.rank
        torch.cuda.set_device(r % torch.cuda.device_count())
        torch.zeros(1, device="cuda")  # initialize CUDA, as a real caller would have
        self._init(backend)

        def item(i):
            # A private stream per item: the all_reduce must see the fill that
            # is still queued behind a long kernel on this stream, which only
            # holds if it was issued on it.
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                t = torch.zeros(4, device="cuda")
                torch.cuda._sleep(20_000_000)
                t.fill_(i + r)
                dist.all_reduce(t)
                return t.cpu()

        results = parallel_map(item, range(6), max_workers=3)
        for i, t in enumerate(results):
            self.assertEqual(t, torch.full((4,), float(2 * i + 1)))
        self._assert_clean()

    @requires_gloo()
    @skip_if_lt_x_gpu(1)
    def test_stream_per_worker(self):
        r = self.rank
        torch.cuda.set_device(0)
        caller_stream = torch.cuda.current_stream()
        self._init("gloo")

        def item(i):
            # Runs on the worker's own stream; the result is read by the caller
            # on its stream without any synchronization of its own.
            t = torch.zeros(4, device="cuda")
            torch.cuda._sleep(20_000_000)
            t.fill_(i + r)
            dist.all_reduce(t)
            return torch.cuda.current_stream().stream_id, t * 1

        results = parallel_map(item, range(6), max_workers=3, stream_per_worker=True)
        streams = {stream for stream, _ in results}
        self.assertNotIn(caller_stream.stream_id, streams)
        self.assertLessEqual(len(streams), 3)
        # on the caller's stream
        total = torch.stack([t for _, t in results]).sum(dim=0)
        self.assertEqual(
            total.cpu(), torch.full((4,), float(sum(2 * i + 1 for i in range(6))))
        )
        self._assert_clean()

    @requires_gloo()
    @skip_if_lt_x_gpu(1)
    def test_gloo_cuda_tensors_on_worker_streams(self):
        self._check_issued_on_worker_stream("gloo")

    @requires_nccl()
    @skip_if_lt_x_gpu(2)
    def test_nccl_on_worker_streams(self):
        self._check_issued_on_worker_stream("nccl")


class ParallelMapWorld4Test(_TestsForEveryWorldSize, _ParallelMapTestBase):
    @property
    def world_size(self):
        return 4

    @requires_gloo()
    def test_data_dependent_counts_under_random_delays(self):
        self._check_data_dependent_counts_under_random_delays(max_workers=3)

    @requires_gloo()
    def test_coalesced_all_reduces_under_random_delays(self):
        self._check_coalesced_all_reduces_under_random_delays(max_workers=3)


class _OneRankTestCase(TestCase):
    """A test in this process alone, on a one-rank gloo group."""

    def setUp(self):
        super().setUp()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def tearDown(self):
        dist.destroy_process_group()
        super().tearDown()


@unittest.skipUnless(hasattr(signal, "pthread_kill"), "needs pthread_kill")
class CtrlCTest(_OneRankTestCase):
    """Ctrl-C on the calling thread stops the call and leaves no busy thread.

    Item 0 sends SIGINT to the main thread while items 1 and 2 wait for
    their turn behind it; they must get CollectiveCancelledError.
    """

    def setUp(self):
        super().setUp()
        # A process started with SIGINT ignored (a background job) keeps it
        # ignored: install Python's own handler for the test.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        if previous is not None:  # None: installed from C, cannot be put back
            self.addCleanup(signal.signal, signal.SIGINT, previous)
        self.cancelled = []

    def _item(self, i):
        if i == 0:
            time.sleep(0.2)  # the coordinator waits on slot 0
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.2)
            return i
        try:
            dist.all_reduce(_full(i))  # waits for slot 0's turn, which never comes
        except RuntimeError as error:
            self.cancelled.append(type(error).__name__)
            raise
        return i

    def _assert_the_next_call_works(self):
        _assert_no_busy_worker(self)
        results = parallel_map(lambda i: _all_reduce_value(i, 0), range(3))
        self.assertEqual(results, [0, 1, 2])

    @requires_gloo()
    def test_ctrl_c_cancels_the_waiting_calls(self):
        with self.assertRaises(KeyboardInterrupt):
            parallel_map(self._item, range(3), max_workers=3)
        self.assertEqual(self.cancelled, ["CollectiveCancelledError"] * 2)
        self._assert_the_next_call_works()

    @requires_gloo()
    def test_ctrl_c_while_a_worker_holds_the_turn(self):
        # Items 1 and 2 call first; item 0's call then lets workers issue them
        # in turn. Ctrl-C comes while item 1's call is being issued: that
        # call completes, item 2's is cancelled, nothing is issued after it.
        group = _PythonBackendGroup.new_group()
        main = threading.main_thread().ident
        item_2_cancelled, stopped_during_the_issue = threading.Event(), []

        def interrupt(tensors):
            if int(tensors[0][0]) == 1:
                signal.pthread_kill(main, signal.SIGINT)
                stopped_during_the_issue.append(item_2_cancelled.wait(10))

        group.on_issue = interrupt

        # Every item started (a Ctrl-C stops only started items; one not yet
        # started never runs), then items 1 and 2 call first.
        all_started = threading.Barrier(3, timeout=10)

        def item(i):
            all_started.wait()
            if i == 0:
                time.sleep(0.2)
            try:
                dist.all_reduce(torch.full((1,), float(i)), group=group)
            except RuntimeError as error:
                self.cancelled.append(type(error).__name__)
                if i == 2:
                    item_2_cancelled.set()
                raise
            return i

        with self.assertRaises(KeyboardInterrupt):
            parallel_map(item, range(3), max_workers=3)
        self.assertEqual(stopped_during_the_issue, [True])
        self.assertEqual([i for i, _ in group.issued_on], [0, 1])
        self.assertEqual(self.cancelled, ["CollectiveCancelledError"])
        self._assert_the_next_call_works()

    @requires_gloo()
    def test_a_second_ctrl_c_while_stopping_still_cancels_every_call(self):
        # The second Ctrl-C lands while the coordinator cancels the waiting
        # calls, inside the turn's locked section: it must be raised only once
        # every call got CANCEL and every thread has ended its item.
        from torch.distributed.threading import _feeder

        close, sent = _feeder.Feeder.close, []

        class SignalOnIteration(list):
            def __iter__(self):
                if not sent:  # once: the stop runs again after the interrupt
                    sent.append(True)
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    time.sleep(0.05)  # the handler runs inside Turn.stop's section
                return super().__iter__()

        def close_and_interrupt(feeder):
            return SignalOnIteration(close(feeder))

        with (
            mock.patch.object(_feeder.Feeder, "close", close_and_interrupt),
            self.assertRaises(KeyboardInterrupt),
        ):
            parallel_map(self._item, range(3), max_workers=3)
        self.assertEqual(sent, [True])
        self.assertEqual(self.cancelled, ["CollectiveCancelledError"] * 2)
        self._assert_the_next_call_works()

    def test_a_ctrl_c_as_the_call_ends_leaves_no_claim_on_the_top_level(self):
        # The call's last steps restore the caller's intra-op threads and
        # release the top level; a Ctrl-C landing there (here: raised while
        # the threads are restored) must not leave it claimed, or every later
        # call from another thread would be refused.
        from torch.distributed.threading import _parallel_map

        real = torch.set_num_threads

        def interrupted(n):
            real(n)
            if threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt  # workers set theirs too: not there

        with (
            self.assertRaises(KeyboardInterrupt),
            mock.patch.object(torch, "set_num_threads", interrupted),
        ):
            parallel_map(lambda i: i, range(4), max_workers=2)
        self.assertIsNone(_parallel_map._owner)
        other = []
        thread = threading.Thread(
            target=lambda: other.append(parallel_map(str, range(2), max_workers=2))
        )
        thread.start()
        thread.join()
        self.assertEqual(other, [["0", "1"]])


class _PythonBackendGroup(dist.ProcessGroup):
    """A one-rank process group written in Python, registered as a backend.

    Its all_reduce runs ``on_issue`` (user code on the issue path) and
    records which thread issued it, for which item (the tensor's value).
    """

    NAME = "test_parallel_map_python"

    def __init__(self):
        super().__init__(0, 1)
        self.on_issue = lambda tensors: None
        self.issued_on = []

    @classmethod
    def new_group(cls):
        if cls.NAME.upper() not in dist.Backend._plugins:
            dist.Backend.register_backend(
                cls.NAME, lambda *args: cls(), extended_api=True, devices=["cpu"]
            )
        return dist.new_group(backend=cls.NAME)

    def allreduce(self, tensors, opts):
        self.on_issue(tensors)
        self.issued_on.append((int(tensors[0][0]), threading.current_thread()))
        future = torch.futures.Future()
        future.set_result(tensors)
        return torch._C._distributed_c10d._create_work_from_future(future)

    def getBackendName(self):
        return self.NAME


@instantiate_parametrized_tests
class TurnTest(_OneRankTestCase):
    """Workers issue their calls themselves when they hold the turn."""

    @requires_gloo()
    def test_workers_issue_calls_at_the_turn(self):
        # The turn numbers each issue on the thread that issues it.
        from torch.distributed.threading import _turn

        issuers = []
        count = _turn.Turn._count

        def record(turn, call):
            issuers.append(threading.current_thread().name)
            count(turn, call)

        def item(i):
            for _ in range(20):
                dist.all_reduce(torch.ones(1))
            return i

        with mock.patch.object(_turn.Turn, "_count", record):
            self.assertEqual(parallel_map(item, range(4), max_workers=2), [0, 1, 2, 3])
        self.assertEqual(len(issuers), 80)
        workers = [name for name in issuers if name.startswith("parallel_map")]
        # The coordinating thread sleeps while the items post at the open turn.
        self.assertGreater(len(workers), 0, issuers)

    @requires_gloo()
    def test_only_torchs_own_code_may_be_issued_for_another_item(self):
        # Another item's worker may issue a call only if the issue runs no
        # user code: torch's entry points on plain tensors, no mode or
        # saved-tensor hook active, a group of torch's own backends.
        from torch.distributed.threading import _calls
        from torch.distributed.threading._thread_state import CallState
        from torch.utils._python_dispatch import TorchDispatchMode

        def runs_torch_only(fn, **kwargs):
            state = CallState.capture()
            call = _calls.Call(fn, kwargs, _calls.ASYNC_THEN_WAIT, 0, 0, None, state)
            return _calls.issue_runs_torch_only(call)

        class Subclass(torch.Tensor):
            pass

        plain, sub = torch.zeros(1), torch.zeros(1).as_subclass(Subclass)
        python_group = _PythonBackendGroup.new_group()
        self.assertTrue(runs_torch_only(dist.all_reduce, tensor=plain, group=None))
        gather = functools.partial(runs_torch_only, dist.all_gather, group=None)
        self.assertTrue(gather(tensor_list=[plain, plain], tensor=plain))
        self.assertFalse(gather(tensor_list=[plain, sub], tensor=plain))
        self.assertFalse(runs_torch_only(dist.all_reduce, tensor=sub, group=None))
        self.assertFalse(
            runs_torch_only(dist.all_reduce, tensor=plain, group=python_group)
        )
        # gloo named as a backend torch does not ship (answers are cached per config)
        self.addCleanup(_calls._names_torchs_backends.cache_clear)
        with mock.patch.object(_calls, "_TORCH_BACKENDS", frozenset({"nccl"})):
            _calls._names_torchs_backends.cache_clear()
            self.assertFalse(runs_torch_only(dist.all_reduce, tensor=plain, group=None))
        _calls._names_torchs_backends.cache_clear()
        self.assertTrue(runs_torch_only(dist.all_reduce, tensor=plain, group=None))
        with TorchDispatchMode():
            self.assertFalse(runs_torch_only(dist.all_reduce, tensor=plain, group=None))
        # A pack hook is user code that the issue may run.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            self.assertFalse(runs_torch_only(dist.all_reduce, tensor=plain, group=None))

    @requires_gloo()
    def test_the_turn_goes_from_worker_to_worker_without_the_coordinator(self):
        # Each call arrives while nothing waits at the turn's slot: its own
        # worker takes the turn, issues, and leaves the turn open for the next.
        group = _PythonBackendGroup.new_group()
        ran_on = {}

        def item(i):
            ran_on[i] = threading.current_thread()
            for k in range(3):
                time.sleep(0.05 if (i, k) == (0, 0) else 0.1)  # item 0, then by turns
                dist.all_reduce(torch.full((1,), float(i)), group=group)

        parallel_map(item, range(2), max_workers=2)
        order = promised_order([3, 3], 2)
        self.assertEqual(group.issued_on, [(i, ran_on[i]) for i, _ in order])

    @requires_gloo()
    def test_the_turn_goes_to_the_waiting_calls_of_the_following_slots_in_order(self):
        # Items 1 to 3 call before item 0 does: item 0's worker takes the
        # turn, and the turn goes from worker to worker, each issuing its own
        # call (a Python backend's: not served) in the schedule's order.
        group = _PythonBackendGroup.new_group()
        ran_on = {}
        posted = threading.Barrier(3, timeout=10)

        def item(i):
            ran_on[i] = threading.current_thread()
            if i == 0:
                time.sleep(0.3)  # the others' calls wait for their turn by now
            dist.all_reduce(torch.full((1,), float(i)), group=group)
            if i:
                posted.wait()  # their second calls wait for their turn too
            dist.all_reduce(torch.full((1,), float(i)), group=group)

        parallel_map(item, range(4), max_workers=4)
        order = promised_order([2, 2, 2, 2], 4)
        self.assertEqual(group.issued_on[:4], [(i, ran_on[i]) for i, _ in order[:4]])
        self.assertEqual([i for i, _ in group.issued_on], [i for i, _ in order])

    @requires_gloo()
    def test_a_python_backends_calls_are_not_coalesced(self):
        # Coalesced, item 1's call would be issued together with item 0's,
        # while item 0 holds the lock.
        group, _ = self._lock_held_around_item_0s_call(coalesce_all_reduces=True)
        self.assertEqual([i for i, _ in group.issued_on], [0, 1])

    @requires_gloo()
    def test_no_worker_takes_the_turn_while_calls_are_held_to_coalesce(self):
        # The coordinator holds item 0's all_reduce back to coalesce it. Item
        # 1's call comes next in the schedule: its worker must not issue it
        # at its turn, ahead of the held one (another rank may pair them the
        # other way round).
        group = _PythonBackendGroup.new_group()
        world = dist.group.WORLD
        before = world._get_sequence_number_for_group()

        def check_the_held_call_went_first(tensors):
            if world._get_sequence_number_for_group() != before + 1:
                raise AssertionError("issued before the held all_reduce")

        group.on_issue = check_the_held_call_went_first
        held = torch.ones(2)

        def item(i):
            if i == 0:
                dist.all_reduce(held)
            else:
                time.sleep(0.2)  # the coordinator holds item 0's call meanwhile
                dist.all_reduce(torch.ones(1), group=group)

        # Run where a wrong order (a deadlock: nothing issues the held call)
        # fails the test instead of hanging it.
        outcome = []

        def run():
            try:
                outcome.append(
                    parallel_map(
                        item, range(2), max_workers=2, coalesce_all_reduces=True
                    )
                )
            except BaseException as error:  # reported below
                outcome.append(error)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        runner.join(60)
        self.assertTrue(outcome, "deadlocked: a worker took the turn")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        self.assertEqual(outcome, [[None, None]])
        self.assertEqual([i for i, _ in group.issued_on], [1])
        self.assertEqual(held, torch.ones(2))

    def _group_served_as_torchs(self):
        """A ``_PythonBackendGroup`` whose calls the schedule treats as running
        only torch's code, so that the thread it records is the one that
        served them."""
        from torch.distributed.threading import _calls

        group = _PythonBackendGroup.new_group()
        torchs = _calls.backends_are_torchs
        patcher = mock.patch.object(
            _calls, "backends_are_torchs", lambda g: g is group or torchs(g)
        )
        patcher.start()
        self.addCleanup(patcher.stop)
        return group

    @requires_gloo()
    def test_the_holder_of_the_turn_issues_the_waiting_calls_that_run_only_torch(self):
        # Items 1 to 3 call before item 0 does: item 0's worker takes the
        # turn and issues all four calls in the schedule's order on its own
        # thread; each item still gets its own result.
        group = self._group_served_as_torchs()
        ran_on = {}

        def item(i):
            ran_on[i] = threading.current_thread()
            if i == 0:
                time.sleep(0.3)  # the others' calls wait for their turn by now
            t = torch.full((1,), float(i))
            dist.all_reduce(t, group=group)
            return t.item()

        self.assertEqual(parallel_map(item, range(4), max_workers=4), [0, 1, 2, 3])
        self.assertEqual([i for i, _ in group.issued_on], [0, 1, 2, 3])
        self.assertEqual([t for _, t in group.issued_on], [ran_on[0]] * 4)

    @parametrize("why", ["tensor subclass", "dispatch mode"])
    @requires_gloo()
    def test_the_holder_of_the_turn_does_not_issue_calls_that_may_run_user_code(
        self, why
    ):
        # Item 1's call has a tensor subclass argument, or a dispatch mode is
        # active: its issue may run user code, so item 0's worker hands it the
        # turn instead of issuing it from inside item 0's own call. (A
        # __torch_function__ mode has run by the time the call is handed over,
        # and is not active inside it: such a call may be served.)
        from torch.utils._python_dispatch import TorchDispatchMode

        class Subclass(torch.Tensor):
            pass

        class DispatchMode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        group = self._group_served_as_torchs()
        ran_on = {}

        def item(i):
            ran_on[i] = threading.current_thread()
            t = torch.full((1,), float(i))
            if i == 0:
                time.sleep(0.3)  # item 1's call waits for its turn by now
                dist.all_reduce(t, group=group)
            elif why == "tensor subclass":
                dist.all_reduce(t.as_subclass(Subclass), group=group)
            else:
                with DispatchMode():
                    dist.all_reduce(t, group=group)

        parallel_map(item, range(2), max_workers=2)
        self.assertEqual(group.issued_on, [(0, ran_on[0]), (1, ran_on[1])])

    @requires_gloo()
    def test_an_issue_that_raises_on_a_worker_raises_in_its_own_item(self):
        # Item 0's worker holds the turn and serves item 1's and item 2's
        # waiting calls. The issues of items 0 and 1 raise (item 1's something
        # that is not an Exception): each reaches its own item only, as
        # serially, and the turn goes on, so item 2's call is issued.
        class Abort(BaseException):
            pass

        def fail(tensors):
            if tensors[0][0] == 0:
                raise ValueError("bad issue 0")
            if tensors[0][0] == 1:
                raise Abort("bad issue 1")

        group = self._group_served_as_torchs()
        group.on_issue = fail

        def item(i):
            if i == 0:
                time.sleep(0.3)  # items 1 and 2 wait for their turn by now
            try:
                dist.all_reduce(torch.full((1,), float(i)), group=group)
            except (ValueError, Abort) as error:
                return str(error)
            return "issued"

        result = []
        runner = threading.Thread(
            target=lambda: result.append(parallel_map(item, range(3), max_workers=3)),
            daemon=True,
        )
        runner.start()
        runner.join(10)
        self.assertFalse(runner.is_alive(), "parallel_map hung")
        self.assertEqual(result, [["bad issue 0", "bad issue 1", "issued"]])
        self.assertEqual([i for i, _ in group.issued_on], [2])

    def _lock_held_around_item_0s_call(self, **options):
        """Item 0 holds a lock around its all_reduce on a ``_PythonBackendGroup``,
        whose issue of item 1's all_reduce takes that lock. Returns the group
        and the thread that ran each item."""
        group = _PythonBackendGroup.new_group()
        lock = threading.Lock()

        def take_lock(tensors):
            if tensors[0][0] == 1:  # item 1's call
                if not lock.acquire(timeout=5):
                    raise AssertionError("item 1's call was issued inside item 0's")
                lock.release()

        group.on_issue = take_lock
        ran_on = {}

        def item(i):
            ran_on[i] = threading.current_thread()
            if i == 0:
                time.sleep(0.2)  # item 1's call waits for its turn by now
                with lock:
                    dist.all_reduce(torch.zeros(1), group=group)
            else:
                dist.all_reduce(torch.ones(1), group=group)
            return i

        self.assertEqual(parallel_map(item, range(2), max_workers=2, **options), [0, 1])
        return group, ran_on

    @requires_gloo()
    def test_a_python_backend_runs_on_its_own_items_thread(self):
        # A process group written in Python is user code on the issue path.
        # Had item 0's worker issued item 1's waiting call from inside its own
        # call, that call would wait for a lock its own thread holds.
        group, ran_on = self._lock_held_around_item_0s_call()
        self.assertEqual([i for i, _ in group.issued_on], [0, 1])
        self.assertIn(group.issued_on[1][1], (ran_on[1], threading.main_thread()))

    @requires_gloo()
    def test_user_code_in_an_issue_runs_in_its_items_context(self):
        # Item 0's object collective keeps the turn with the coordinator while
        # the other items' calls wait, so the coordinator issues them too. The
        # code of a process group written in Python, and the pickling of an
        # object collective, read and set their item's contextvars there, as
        # in the loop; nothing reaches the caller's.
        group = _PythonBackendGroup.new_group()
        read = contextvars.ContextVar("read")
        written = contextvars.ContextVar("written")
        observed, pickled = [], []

        class Pickled:
            def __reduce__(self):
                pickled.append(read.get(None))
                return (int, (0,))

        def on_issue(tensors):
            i = int(tensors[0][0])
            observed.append((i, read.get(None)))
            written.set(i * 10)

        group.on_issue = on_issue

        def item(i):
            read.set(i)
            if i == 0:
                time.sleep(0.3)  # the others' calls wait for their turn by now
                dist.all_gather_object([None], Pickled())
            dist.all_reduce(torch.full((1,), float(i)), group=group)
            return written.get(None)

        for _ in range(2):  # each call starts from the caller's context
            observed.clear()
            pickled.clear()
            results = parallel_map(item, range(4), max_workers=4)
            self.assertEqual(results, [0, 10, 20, 30])
            self.assertEqual(sorted(observed), [(i, i) for i in range(4)])
            self.assertEqual(pickled, [0])
        self.assertIsNone(written.get(None))


class HangReportTest(_OneRankTestCase):
    """The hang report: what each worker waits on, and why, with stacks."""

    def _reports(self, logs):
        return [line for line in logs.output if "has waited" in line]

    @requires_gloo()
    def test_a_report_names_waits_and_stacks(self):
        release = threading.Event()

        def item(i):
            if i == 0:
                release.wait(timeout=10)  # the coordinator waits on this slot
            else:
                dist.all_reduce(torch.ones(1))
            return i

        timer = threading.Timer(0.6, release.set)
        timer.start()
        with self.assertLogs("torch.distributed.threading", "WARNING") as logs:
            parallel_map(item, range(2), max_workers=2, report_hang_after=0.2)
        timer.join()
        reports = self._reports(logs)
        # Once per interval (about 3 in 0.6 s), not continuously.
        self.assertTrue(1 <= len(reports) <= 10, reports)
        self.assertIn("for the next event of item 0", reports[0])
        self.assertIn("item 0: running fn", reports[0])
        self.assertIn(
            "item 1: waiting for its turn to issue all_reduce (item 1, call 0)",
            reports[0],
        )
        self.assertIn("release.wait(timeout=10)", reports[0])  # the waiter's stack
        with self.assertRaisesRegex(ValueError, "report_hang_after"):
            parallel_map(str, [1, 2], report_hang_after=0)

    @requires_gloo()
    def test_a_report_explains_items_that_wait_for_each_other(self):
        # Item 1 waits for an event that item 0 sets only after its second
        # collective, which the schedule issues only after item 1's next event:
        # a deadlock the serial loop would not have (the wait times out here).
        after_second = threading.Event()

        def item(i):
            if i == 0:
                dist.all_reduce(torch.ones(1))
                dist.all_reduce(torch.ones(1))
                after_second.set()
                return True
            return after_second.wait(timeout=1.0)

        with self.assertLogs("torch.distributed.threading", "WARNING") as logs:
            results = parallel_map(item, range(2), max_workers=2, report_hang_after=0.3)
        self.assertEqual(results, [True, False])
        reports = self._reports(logs)
        self.assertTrue(reports)
        self.assertIn("item 1: running fn", reports[0])
        self.assertIn(
            "item 0: waiting for its turn to issue all_reduce (item 0, call 1)",
            reports[0],
        )
        self.assertIn("items must not wait for each other", reports[0])


class WorkerPoolTest(TestCase):
    def _workers(self):
        return {t for t in threading.enumerate() if t.name.startswith("parallel_map")}

    def _wait_until_no_workers(self):
        for _ in range(500):  # idle threads exit after IDLE_TIMEOUT_S
            if not self._workers():
                return
            time.sleep(0.02)
        self.fail(f"workers still alive: {self._workers()}")

    def test_idle_workers_are_reused_then_exit(self):
        self._wait_until_no_workers()  # of earlier tests
        with mock.patch.object(_pool, "IDLE_TIMEOUT_S", 60.0):  # however slow
            parallel_map(str, range(3), max_workers=3)
            first = self._workers()
            self.assertEqual(len(first), 3)
            self.assertEqual(_pool.pool.idle_count(), 3)
            parallel_map(str, range(3), max_workers=3)
            self.assertEqual(self._workers(), first)  # the same threads served it
        with mock.patch.object(_pool, "IDLE_TIMEOUT_S", 0.05):
            parallel_map(str, range(3), max_workers=3)  # now idle for 0.05 s
            self._wait_until_no_workers()
        self.assertEqual(_pool.pool.idle_count(), 0)

    def test_a_ctrl_c_before_the_threads_are_back_in_the_pool_ends_them(self):
        # Ctrl-C after the items ended but before their threads went back to
        # the pool: the threads must end, not wait for a job for good.
        self._wait_until_no_workers()

        def interrupted(threads):
            raise KeyboardInterrupt

        with (
            mock.patch.object(_pool.pool, "release", interrupted),
            self.assertRaises(KeyboardInterrupt),
        ):
            parallel_map(str, range(3), max_workers=3)
        self.assertEqual(self._workers(), set())  # ended before the raise

    def test_a_base_exception_from_the_iterable_leaves_the_pool_usable(self):
        # The iterable's BaseException is raised by the call, and no thread
        # that it ended goes back to the pool, where the next call would
        # wait on it for good.
        class Stop(BaseException):
            pass

        def items():
            yield from range(6)
            raise Stop("stop the loop")

        def drain():  # for the later tests, which wait for no workers
            with mock.patch.object(_pool, "IDLE_TIMEOUT_S", 0.05):
                parallel_map(str, range(2), max_workers=2)
                self._wait_until_no_workers()

        self.addCleanup(drain)
        with mock.patch.object(_pool, "IDLE_TIMEOUT_S", 60.0):  # threads stay
            with self.assertRaisesRegex(Stop, "stop the loop"):
                parallel_map(str, items(), max_workers=2)
            _assert_no_busy_worker(self)
            for _ in range(3):
                self.assertEqual(
                    parallel_map(str, range(6), max_workers=2), list("012345")
                )

    def test_no_worker_thread_is_left_for_interpreter_finalization(self):
        # A daemon thread that wakes during finalization is ended with
        # pthread_exit before Python 3.14, which aborts the process when C++
        # frames are on its stack. atexit callbacks run last-registered first:
        # `finalizing` runs after the pool has closed, and `late_call` calls
        # parallel_map after that, as another atexit callback might.
        probe = (
            "import atexit, threading\n"
            "def finalizing():\n"
            "    left = [t.name for t in threading.enumerate()\n"
            "            if t.name.startswith('parallel_map')]\n"
            "    assert not left, left\n"
            "    print('checked', flush=True)\n"
            "def late_call():\n"
            "    assert parallel_map(str, range(3), max_workers=3) == ['0', '1', '2']\n"
            "atexit.register(finalizing)\n"
            "atexit.register(late_call)\n"
            "from torch.distributed.threading import _pool, parallel_map\n"
            "_pool.IDLE_TIMEOUT_S = 3600.0\n"
            "parallel_map(str, range(3), max_workers=3)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, "checked\n")  # the check ran
        # An error in an atexit callback is printed, and leaves the code at 0.
        self.assertNotIn("Traceback", done.stderr)


class ProfilerSpansTest(_ParallelMapTestBase):
    @property
    def world_size(self):
        return 2

    @requires_gloo()
    def test_trace_shows_items_waits_and_issues(self):
        self._init()
        item_1_calls = threading.Event()

        def item(i):
            if i == 0:  # the schedule waits at slot 0 while item 1 calls early
                item_1_calls.wait(timeout=60)
                time.sleep(0.1)  # for item 1 to post its call and wait
            elif i == 1:
                item_1_calls.set()
            return _all_reduce_value(i, self.rank) + _all_reduce_value(i, 0)

        # Worker threads are recorded only with profile_all_threads.
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        profile = torch.profiler.profile(
            activities=activities, experimental_config=config
        )
        with profile as prof, torch.profiler.record_function("the caller"):
            results = parallel_map(item, range(4), max_workers=2)
        ws = self.world_size
        self.assertEqual(results, [2 * ws * i + ws * (ws - 1) / 2 for i in range(4)])
        events = [(e.name, e.thread) for e in prof.events()]
        names = [name for name, _ in events]
        for i in range(4):
            self.assertEqual(names.count(f"parallel_map item {i}"), 1)
            for k in range(2):
                issue = f"parallel_map issue all_reduce (item {i}, call {k})"
                self.assertEqual(names.count(issue), 1, issue)
        self.assertIn("parallel_map wait all_reduce", names)  # item 1 waited
        item_threads = {t for name, t in events if name.startswith("parallel_map item")}
        self.assertEqual(len(item_threads), 2)  # the two workers
        # (The profiler's own thread numbers, not the OS's.)
        caller = {t for name, t in events if name == "the caller"}
        self.assertEqual(len(caller), 1)
        self.assertFalse(caller & item_threads)
        self._assert_clean()

    def test_no_span_without_a_profiler(self):
        # Not even a new no-op context on the per-call paths.
        profiling = importlib.import_module("torch.distributed.threading._profiling")
        self.assertIs(profiling.span("item", 0), profiling.span("issue", 1))


class ItemFailureTest(TestCase):
    def _fail_items_1_and_3(self):
        def item(i):
            if i in (1, 3):
                raise ValueError(f"item {i} failed")
            return i

        with self.assertRaisesRegex(ValueError, "item 1 failed") as caught:
            parallel_map(item, range(6), max_workers=4)
        return caught.exception

    def test_the_lowest_failed_item_is_raised(self):
        self._fail_items_1_and_3()

    def test_the_other_failures_are_attached_as_notes(self):
        notes = getattr(self._fail_items_1_and_3(), "__notes__", [])
        self.assertEqual(
            notes, ["parallel_map: item 3 also failed: ValueError: item 3 failed"]
        )


class ScheduleCheckGroupTest(TestCase):
    def test_the_check_group_ends_with_its_world(self):
        # The check's own process group belongs to the world it checks:
        # destroy_process_group() ends it (a group kept alive would keep its
        # gloo threads into interpreter exit), and the next world's checked
        # call creates one of its own.
        import gc
        import weakref

        for _ in range(2):
            dist.init_process_group(
                "gloo", store=dist.HashStore(), rank=0, world_size=1
            )
            try:
                before = set(dist.distributed_c10d._world.pg_map)
                results = parallel_map(
                    lambda i: _all_reduce_value(i, 0),
                    range(4),
                    max_workers=2,
                    check_schedule=True,
                )
                self.assertEqual(results, [0.0, 1.0, 2.0, 3.0])
                created = [
                    group
                    for group in dist.distributed_c10d._world.pg_map
                    if group not in before
                ]
                self.assertEqual(len(created), 1)
                check_group = weakref.ref(created[0])
                del before, created
            finally:
                dist.destroy_process_group()
            gc.collect()
            self.assertIsNone(check_group(), "the check group outlived its world")


@instantiate_parametrized_tests
class IntraOpThreadsTest(TestCase):
    """Workers share the caller's intra-op threads; the caller keeps its count."""

    def setUp(self):
        super().setUp()
        self.addCleanup(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(6)

    def _seen_by_items(self, **kwargs):
        return parallel_map(
            lambda _: torch.get_num_threads(), range(4), max_workers=2, **kwargs
        )

    def _assert_the_callers_count_is_back(self):
        # On the caller, and for threads started later: a worker's
        # set_num_threads also sets the count new threads start with.
        started_later = []
        thread = threading.Thread(
            target=lambda: started_later.append(torch.get_num_threads())
        )
        thread.start()
        thread.join()
        self.assertEqual((torch.get_num_threads(), started_later), (6, [6]))

    def test_workers_divide_the_callers_threads_by_default(self):
        self.assertEqual(self._seen_by_items(), [3, 3, 3, 3])
        self._assert_the_callers_count_is_back()

    def test_intra_op_threads_sets_each_workers_count(self):
        self.assertEqual(self._seen_by_items(intra_op_threads=5), [5, 5, 5, 5])
        self._assert_the_callers_count_is_back()

    @parametrize("value, error", [(0, ValueError), (True, TypeError), (1.5, TypeError)])
    def test_a_bad_count_is_refused(self, value, error):
        with self.assertRaisesRegex(error, "intra_op_threads must be"):
            self._seen_by_items(intra_op_threads=value)


class ImportWithoutForkTest(TestCase):
    def test_imports_where_os_has_no_fork(self):
        # Windows has no os.register_at_fork; the package must import there too.
        probe = (
            "import os, torch\n"
            "del os.register_at_fork\n"
            "import torch.distributed.threading\n"
        )
        subprocess.run([sys.executable, "-c", probe], check=True)


class PublicApiTest(TestCase):
    """The rules test_public_bindings.py enforces, for this package."""

    def test_public_names(self):
        module = importlib.import_module("torch.distributed.threading")
        self.assertEqual(
            module.__all__,
            [
                "CollectiveBypassError",
                "CollectiveCancelledError",
                "ScheduleMismatchError",
                "coordinated",
                "item_generator",
                "parallel_map",
            ],
        )
        for name in module.__all__:
            self.assertEqual(
                getattr(module, name).__module__, "torch.distributed.threading"
            )
        public = {n for n in dir(module) if not n.startswith("_")}
        self.assertEqual(public, set(module.__all__))
        for info in pkgutil.iter_modules(module.__path__):
            self.assertTrue(info.name.startswith("_"), f"public submodule {info.name}")
            # What a private module exports is public only through the package.
            sub = importlib.import_module(f"torch.distributed.threading.{info.name}")
            self.assertLessEqual(
                set(getattr(sub, "__all__", [])), set(module.__all__), info.name
            )

    def test_import_has_no_side_effects(self):
        probe = (
            "import logging, threading, torch\n"
            "import torch.distributed.distributed_c10d as c10d\n"
            "def state():\n"
            "    return (threading.active_count(), torch.get_num_threads(),\n"
            "            torch.cuda.is_initialized(), c10d._collective_hook.fn,\n"
            "            len(logging.getLogger().handlers),\n"
            "            len(logging.getLogger('torch.distributed.threading').handlers))\n"
            "before = state()\n"
            "import torch.distributed.threading\n"
            "assert state() == before, (before, state())\n"
        )
        subprocess.run([sys.executable, "-c", probe], check=True)


if __name__ == "__main__":
    run_tests()
