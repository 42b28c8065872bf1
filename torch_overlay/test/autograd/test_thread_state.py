# Owner(s): ["module: autograd"]
"""torch._C._autograd._set_sequence_nr, _ThreadLocalState and _set_thread_local_state."""

import threading

import torch
from torch._C._autograd import (
    _get_sequence_nr,
    _set_sequence_nr,
    _set_thread_local_state,
    _ThreadLocalState,
)
from torch.testing._internal.common_utils import run_tests, TestCase


def _on_thread(fn):
    """Run ``fn`` on a new thread; return its result or raise its error."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as error:  # re-raised on the caller
            out["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class _Tag(torch.autograd.Function):
    """Identity; its backward records its tag, so a backward's visit order shows."""

    @staticmethod
    def forward(ctx, x, tag, visits):
        ctx.tag, ctx.visits = tag, visits
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.visits.append(ctx.tag)
        return grad, None, None


class TestSequenceNr(TestCase):
    def test_the_next_node_takes_the_number_set(self):
        x = torch.ones(2, requires_grad=True)
        for value in (5, 1 << 40, 3):
            _set_sequence_nr(value)
            self.assertEqual(_get_sequence_nr(), value)
            self.assertEqual((x * 2).grad_fn._sequence_nr(), value)
            self.assertEqual(_get_sequence_nr(), value + 1)

    def test_each_thread_has_its_own_number(self):
        _set_sequence_nr(100)

        def other():
            _set_sequence_nr(1 << 50)
            return _get_sequence_nr()

        self.assertEqual(_on_thread(other), 1 << 50)
        self.assertEqual(_get_sequence_nr(), 100)

    def test_numbers_set_per_item_give_the_loops_backward_order(self):
        # Items built on threads in reverse order: their nodes' numbers, set
        # per item as a loop would have given them, decide the backward's
        # order, not which thread built what first.
        def build(visits, item_range):
            leaves = [torch.ones(1, requires_grad=True) for _ in range(4)]
            outs = [None] * 4
            for i in reversed(range(4)):

                def item(i=i):
                    if item_range is not None:
                        _set_sequence_nr(item_range(i))
                    y = _Tag.apply(leaves[i] * 1.0, (i, 0), visits)
                    return _Tag.apply(y * 2.0, (i, 1), visits)

                outs[i] = _on_thread(item)
            return outs

        serial_visits, serial_outs = [], []
        leaves = [torch.ones(1, requires_grad=True) for _ in range(4)]
        for i in range(4):
            y = _Tag.apply(leaves[i] * 1.0, (i, 0), serial_visits)
            serial_outs.append(_Tag.apply(y * 2.0, (i, 1), serial_visits))
        sum(serial_outs).sum().backward()

        start = _get_sequence_nr()
        visits = []
        outs = build(visits, lambda i: start + i * (1 << 32))
        _set_sequence_nr(start + 4 * (1 << 32))
        sum(outs).sum().backward()
        self.assertEqual(visits, serial_visits)

        unordered = []
        outs = build(unordered, None)  # each fresh thread starts at 0
        sum(outs).sum().backward()
        self.assertNotEqual(unordered, serial_visits)

    def test_python_ints_beyond_64_bits_are_refused(self):
        for value in (1 << 64, -1):
            with self.assertRaises((OverflowError, TypeError)):
                _set_sequence_nr(value)


class TestThreadLocalState(TestCase):
    def test_state_captured_here_applies_on_another_thread(self):
        packed = []

        def pack(t):
            packed.append(threading.get_ident())
            return t

        with (
            torch.no_grad(),
            torch.autocast("cpu", dtype=torch.bfloat16),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            state = _ThreadLocalState()
        x = torch.ones(2, 2, requires_grad=True)

        def other():
            own = _ThreadLocalState()
            _set_thread_local_state(state)
            try:
                inside = (
                    torch.is_grad_enabled(),
                    torch.is_autocast_enabled("cpu"),
                    (x @ x).dtype,
                )
                with torch.enable_grad():
                    (x * x).sum()  # saves x twice, through the hook
            finally:
                _set_thread_local_state(own)
            after = (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))
            return inside, after, threading.get_ident()

        inside, after, ident = _on_thread(other)
        self.assertEqual(inside, (False, True, torch.bfloat16))
        self.assertEqual(after, (True, False))
        self.assertEqual(packed, [ident, ident])
        self.assertTrue(torch.is_grad_enabled())

    def test_functorch_levels_go_with_the_state(self):
        def per_sample(t):
            state = _ThreadLocalState()
            # Under vmap, t is a batched tensor of this thread's vmap level.
            return _on_thread(lambda: _apply_and(state, lambda: t * 2 + 1))

        x = torch.arange(6.0).reshape(3, 2)
        self.assertEqual(torch.func.vmap(per_sample)(x), x * 2 + 1)

    def test_only_states_are_accepted(self):
        with self.assertRaises(TypeError):
            _set_thread_local_state(object())


def _apply_and(state, fn):
    own = _ThreadLocalState()
    _set_thread_local_state(state)
    try:
        return fn()
    finally:
        _set_thread_local_state(own)


if __name__ == "__main__":
    run_tests()
