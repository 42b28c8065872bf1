"""The demo's decoder-layer loss: its matcher against brute force, its positives."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from layer_loss import DecoderOutputs, min_cost_matching


def _best_total(cost: list[list[float]]) -> float:
    rows, cols = len(cost), len(cost[0]) if cost else 0
    return min(sum(cost[r][c] for r, c in enumerate(perm))
               for perm in itertools.permutations(range(cols), rows))


def test_matching_is_one_to_one_and_of_least_cost() -> None:
    rng = random.Random(12)
    for _ in range(400):
        rows = rng.randint(1, 5)
        cols = rng.randint(rows, 7)
        # Ties (small integers) and distinct costs (floats), mixed.
        cost = [[float(rng.randint(0, 3)) if rng.random() < 0.5 else rng.uniform(-2, 2)
                 for _ in range(cols)] for _ in range(rows)]
        match = min_cost_matching(cost)
        assert len(match) == rows and len(set(match)) == rows
        assert all(0 <= c < cols for c in match)
        total = sum(cost[r][c] for r, c in enumerate(match))
        assert total == pytest.approx(_best_total(cost), abs=1e-9), (cost, match)
    assert min_cost_matching([]) == []
    with pytest.raises(ValueError, match="cannot match 2 rows to 1 columns"):
        min_cost_matching([[0.0], [1.0]])


def test_layers_differ_in_positives() -> None:
    # Without a process group the normalizer is the rank's own count.
    outputs = DecoderOutputs.create(layers=6, seed=0)
    results = [outputs.loss(s, b) for s, b in zip(outputs.cls_scores, outputs.bbox_preds,
                                                  strict=True)]
    positives = [r[3] for r in results]
    targets = sum(len(labels) for labels in outputs.loss.labels)
    assert all(0 <= p <= targets for p in positives)
    # Later layers are closer to the targets: more positives, and the layers
    # differ, so a collective paired with the wrong layer changes the result.
    assert positives[-1] > positives[0]
    assert len(set(positives)) > 1
    assert all(loss > 0 for r in results for loss in r[:3])
