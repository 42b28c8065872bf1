# Owner(s): ["oncall: distributed"]
"""The order parallel_map's schedule promises, checked without threads.

``promised_order`` is that order, written from the rule the docs give; the
schedule's tests with real process groups compare what they record with it.
"""

from torch.distributed.threading._order import SlotCycle
from torch.testing._internal.common_utils import run_tests, TestCase


def promised_order(calls_per_item, max_workers):
    """The (item, call) order the schedule promises, computed without threads.

    Slot ``s`` starts with item ``s``; the slots holding an item are visited
    in turn, and each visit takes one event of its item: its next call, or
    its end, after which the slot takes the next item not yet started.
    """
    waiting = list(range(len(calls_per_item)))
    slots = [[item, 0] for item in waiting[:max_workers]]
    del waiting[:max_workers]
    order, position = [], 0
    while slots:
        item, made = slots[position]
        if made < calls_per_item[item]:
            order.append((item, made))
            slots[position][1] += 1
        elif waiting:
            slots[position] = [waiting.pop(0), 0]
        else:
            del slots[position]
            position -= 1  # the next slot has moved into this position
        if slots:
            position = (position + 1) % len(slots)
    return order


class SlotOrderTest(TestCase):
    def test_slot_cycle_gives_the_promised_order(self):
        def cycle_order(calls_per_item, max_workers):
            n = len(calls_per_item)
            cycle = SlotCycle(list(range(min(max_workers, n))))
            following, made, order = min(max_workers, n), [0] * n, []
            while len(cycle):
                item = cycle.current()
                if made[item] < calls_per_item[item]:
                    order.append((item, made[item]))
                    made[item] += 1
                    cycle.after_call()
                else:
                    cycle.after_end(following if following < n else None)
                    following += 1
            return order

        def every_count(n):  # each item with 0, 1 or 2 calls
            return (
                [[]]
                if n == 0
                else [[*c, k] for c in every_count(n - 1) for k in (0, 1, 2)]
            )

        for n in range(6):
            for calls_per_item in every_count(n):
                for max_workers in range(1, 5):
                    self.assertEqual(
                        cycle_order(calls_per_item, max_workers),
                        promised_order(calls_per_item, max_workers),
                        (calls_per_item, max_workers),
                    )

    def test_promised_order_examples(self):
        # Written out by hand: the reference the schedule's tests rely on.
        self.assertEqual(
            promised_order([2, 1, 2], 2), [(0, 0), (1, 0), (0, 1), (2, 0), (2, 1)]
        )
        # Item 0 ends at once: item 2 takes its slot, and the visit moves on.
        self.assertEqual(promised_order([0, 2, 1], 2), [(1, 0), (2, 0), (1, 1)])
        self.assertEqual(promised_order([1, 1, 1], 3), [(0, 0), (1, 0), (2, 0)])


if __name__ == "__main__":
    run_tests()
