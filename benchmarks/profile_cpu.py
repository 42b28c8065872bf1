"""Where two threads lose on CPU: wall and CPU time, serial vs two raw threads.

    python profile_cpu.py [--items 24] [--repeat 7] [--kinds python tensor layer]
    python profile_cpu.py --only threads --kinds tensor   # one side, to run under perf

No collectives and no parallel_map: this measures what threads themselves
give on this machine, for three items taken from the demo's layer loss
(layer_loss.py), each run ``--items`` times either serially or by a pool of
two threads:

* ``python-shared``, ``python-private``, ``python-own``: the matcher alone
  (pure Python on lists of floats), with the lists shared by the items,
  copied once per item by the calling thread, or made by each item itself
  from a tensor (``tolist()``, as the layer loss does);
* ``tensor``: the layer loss's tensor ops alone (cost matrix, losses), with
  the matching replaced by a fixed assignment;
* ``layer``: the whole layer loss, as the demo runs it (no all_reduce).

For each it prints the speedup of two threads over the serial loop and the
*CPU inflation*: process CPU time (user + system) of the threaded run over
the serial run's. Inflation near 1 with a speedup under 2 means the threads
wait (a lock, or one runs while the other sleeps); inflation above 1 means
the same work costs more CPU on two threads (contended atomics, such as
shared reference counts, cache lines moving between cores, spinning).
Under ``perf record -e cpu-clock -g`` with ``python -X perf``, ``--only``
runs one side so that the two profiles can be compared symbol by symbol.
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from _bench import gil_enabled, header, table
from layer_loss import DecoderOutputs, min_cost_matching


def _items(kind: str) -> Callable[[int], object]:
    outputs = DecoderOutputs.create(layers=6)
    loss = outputs.loss
    layers = len(outputs.cls_scores)
    if kind == "layer":
        return lambda i: loss(outputs.cls_scores[i % layers], outputs.bbox_preds[i % layers])
    costs = []
    for layer in range(layers):
        scores, boxes = outputs.cls_scores[layer][0], outputs.bbox_preds[layer][0]
        targets = loss.boxes[0]
        costs.append((torch.cdist(boxes, targets, p=1) - scores.sigmoid()[:, loss.labels[0]])
                     .T.tolist())
    if kind == "python-shared":  # both threads read the same lists of floats
        return lambda i: min_cost_matching(costs[i % layers])
    if kind == "python-private":  # one copy per item, made by the calling thread
        copies = [[[x + 0.0 for x in row] for row in costs[i % layers]] for i in range(256)]
        return lambda i: min_cost_matching(copies[i % len(copies)])
    tensors = [torch.tensor(cost) for cost in costs]
    if kind == "python-own":  # each item makes its lists itself, as the layer loss does
        return lambda i: min_cost_matching(tensors[i % layers].tolist())

    def tensor_only(i: int) -> object:
        # The layer loss with a fixed matching: its tensor work, little Python.
        cls_scores, bbox_preds = outputs.cls_scores[i % layers], outputs.bbox_preds[i % layers]
        target_scores = torch.zeros_like(cls_scores)
        for image in range(cls_scores.shape[0]):
            scores, pred_boxes = cls_scores[image], bbox_preds[image]
            count = len(loss.labels[image])
            prob = scores.sigmoid()[:, loss.labels[image]]
            pos = loss.focal_alpha * (1 - prob) ** loss.focal_gamma * -(prob + 1e-8).log()
            neg = (1 - loss.focal_alpha) * prob ** loss.focal_gamma * -(1 - prob + 1e-8).log()
            l1 = torch.cdist(pred_boxes, loss.boxes[image], p=1)
            _ = (2 * (pos - neg) + 5 * l1).T.contiguous()
            target_scores[image, torch.arange(count), loss.labels[image]] = 1.0
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            cls_scores, target_scores, reduction="none")
        return float(bce.sum())

    return tensor_only


def _time(run: Callable[[], None]) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``run``."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(kinds: list[str], items: int, repeat: int) -> None:
    header(f"two raw threads vs the serial loop, {items} items, median of {repeat}")
    rows = []
    with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for kind in kinds:
            fn = _items(kind)

            def serial(fn: Callable[[int], object] = fn) -> None:
                for i in range(items):
                    fn(i)

            def threads(fn: Callable[[int], object] = fn) -> None:
                list(pool.map(fn, range(items)))

            serial()
            threads()
            samples: dict[str, list[tuple[float, float]]] = {"serial": [], "threads": []}
            for _ in range(repeat):
                samples["serial"].append(_time(serial))
                samples["threads"].append(_time(threads))
            wall = {k: statistics.median(w for w, _ in v) for k, v in samples.items()}
            cpu = {k: statistics.median(c for _, c in v) for k, v in samples.items()}
            rows.append([kind, wall["serial"] * 1e3 / items, wall["threads"] * 1e3 / items,
                         wall["serial"] / wall["threads"], cpu["threads"] / cpu["serial"]])
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert not gil_enabled(), "the GIL came back on (was triton imported?)"
    table(["item", "serial ms/item", "2 threads ms/item", "speedup", "CPU inflation"], rows)


def only(side: str, kind: str, items: int, seconds: float) -> None:
    """Run one side for about ``seconds`` (for perf)."""
    fn = _items(kind)
    pool = ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,))
    deadline = time.monotonic() + seconds
    rounds = 0
    wall = cpu = 0.0
    while time.monotonic() < deadline:
        if side == "serial":
            w, c = _time(lambda: [fn(i) for i in range(items)])
        else:
            w, c = _time(lambda: list(pool.map(fn, range(items))))
        wall, cpu, rounds = wall + w, cpu + c, rounds + 1
    pool.shutdown()
    print(f"{side} {kind}: {rounds * items} items, {wall * 1e3 / (rounds * items):.3f} ms/item "
          f"wall, {cpu * 1e3 / (rounds * items):.3f} ms/item CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=7)
    kinds = ["python-shared", "python-private", "python-own", "tensor", "layer"]
    parser.add_argument("--kinds", nargs="+", default=kinds, choices=kinds)
    parser.add_argument("--only", choices=["serial", "threads"])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--smoke", action="store_true", help="tiny, untimed: for CI")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.items, args.repeat, args.seconds = 2, 1, 0.1
    if args.only:
        for kind in args.kinds:
            only(args.only, kind, args.items, args.seconds)
        return
    measure(args.kinds, args.items, args.repeat)


if __name__ == "__main__":
    main()
