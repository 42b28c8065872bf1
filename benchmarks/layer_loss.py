"""The demo's default item: the loss of one decoder layer of a DETR-style detector.

A detector with ``L`` decoder layers computes a loss for each layer's
predictions (``B`` images, ``Q`` queries each) against the same targets, in a
loop over layers. Each layer's loss is mostly Python between small kernels:

1. per image, a cost matrix from a few small tensor ops (class probability,
   L1 box distance, generalized IoU), turned into Python lists;
2. per image, a minimum-cost one-to-one matching of targets to queries in
   pure Python (the Hungarian method); matched queries whose box overlaps its
   target by at least ``min_iou`` are the positives;
3. label encoding: a classification target that is the IoU of the matched
   box at the target's class, zero elsewhere, built from Python lists;
4. ``reduce_mean`` of the number of positives: an ``all_reduce`` over the
   ranks divided by the world size, the normalizer every loss term uses;
5. a sigmoid focal loss, an L1 and a GIoU loss, normalized by it.

Every rank has its own images (data parallel) and every layer its own
predictions, so the number of positives differs between layers and ranks:
an item paired with another item's collective, on any rank, gets a different
normalizer and different losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Result of one layer: (classification, L1 box, GIoU) losses and the positives.
LayerResult = tuple[float, float, float, int]


def box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(center x, center y, width, height) boxes as (x0, y0, x1, y1)."""
    center, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([center - size / 2, center + size / 2], dim=-1)


def pairwise_iou_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and generalized IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4),
    both as corners; each an (N, M) tensor."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union
    hull = (torch.maximum(a[:, None, 2:], b[None, :, 2:])
            - torch.minimum(a[:, None, :2], b[None, :, :2])).prod(dim=-1)
    return iou, iou - (hull - union) / hull


def min_cost_matching(cost: list[list[float]]) -> list[int]:
    """A distinct column for every row, with the least total cost (rows <= columns).

    The Hungarian method in its shortest-augmenting-path form: rows join the
    matching one at a time; each search grows a tree of columns by the least
    reduced cost until it reaches a free column, then flips the path. The row
    and column potentials keep every reduced cost non-negative. O(rows^2 cols).

    Returns:
        For each row, the index of its column.
    """
    rows = len(cost)
    cols = len(cost[0]) if rows else 0
    if rows > cols:
        raise ValueError(f"cannot match {rows} rows to {cols} columns one to one")
    # This call's own infinity, not math.inf: the lists and variables below
    # take and drop references to it all the time, and on free-threaded
    # CPython a reference to an object that another thread created is an
    # atomic operation on a shared counter, which two threads running this
    # at once contend on (benchmarks/profile_cpu.py, the layer loss on two
    # threads: 1.7x -> 2.0x over the serial loop).
    inf = float("inf")
    row_pot = [0.0] * rows
    col_pot = [0.0] * cols
    row_of_col = [-1] * cols  # the row each column is matched to, -1 if free
    for new_row in range(rows):
        # dist[c]: least reduced cost of a path from new_row to column c so far;
        # via[c]: the column before c on that path (-1: reached from new_row).
        dist_to = [inf] * cols
        via = [-1] * cols
        done = [False] * cols
        tree_rows = [new_row]  # rows whose potentials move with the tree
        tree_cols: list[int] = []
        row, prev_col, shift = new_row, -1, 0.0
        while True:
            row_cost, potential = cost[row], row_pot[row]
            best, best_col = inf, -1
            for c in range(cols):
                if done[c]:
                    continue
                reduced = row_cost[c] - potential - col_pot[c] + shift
                if reduced < dist_to[c]:
                    dist_to[c] = reduced
                    via[c] = prev_col
                if dist_to[c] < best:
                    best, best_col = dist_to[c], c
            done[best_col] = True
            tree_cols.append(best_col)
            shift = best
            if row_of_col[best_col] < 0:
                break
            row, prev_col = row_of_col[best_col], best_col
            tree_rows.append(row)
        # Move the potentials so that the tree's edges have reduced cost 0.
        for r, c in zip(tree_rows, [-1, *tree_cols[:-1]], strict=True):
            row_pot[r] += shift - (dist_to[c] if c >= 0 else 0.0)
        for c in tree_cols[:-1]:
            col_pot[c] -= shift - dist_to[c]
        # Flip the path: every column on it takes the row before it.
        c = best_col
        while c >= 0:
            before = via[c]
            row_of_col[c] = row_of_col[before] if before >= 0 else new_row
            c = before
    match = [0] * rows
    for c, r in enumerate(row_of_col):
        if r >= 0:
            match[r] = c
    return match


@dataclass(frozen=True)
class LayerLoss:
    """The loss of one decoder layer; ``__call__(cls_scores, bbox_preds)``."""

    labels: list[torch.Tensor]  # per image: (T,) class indices
    boxes: list[torch.Tensor]  # per image: (T, 4) (cx, cy, w, h) in [0, 1]
    num_classes: int
    min_iou: float = 0.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0

    def match(self, scores: torch.Tensor, pred_boxes: torch.Tensor, image: int
              ) -> tuple[list[int], list[int], list[float]]:
        """Positives of one image: (query, target, IoU) lists."""
        labels, boxes = self.labels[image], self.boxes[image]
        if len(labels) == 0:
            return [], [], []
        prob = scores.sigmoid()[:, labels]  # (Q, T)
        # Focal-style class cost: cheap where the target's class is likely.
        pos = self.focal_alpha * (1 - prob) ** self.focal_gamma * -(prob + 1e-8).log()
        neg = (1 - self.focal_alpha) * prob ** self.focal_gamma * -(1 - prob + 1e-8).log()
        iou, giou = pairwise_iou_giou(box_corners(pred_boxes), box_corners(boxes))
        l1 = torch.cdist(pred_boxes, boxes, p=1)
        cost = self.class_weight * (pos - neg) + self.l1_weight * l1 - self.giou_weight * giou
        queries = min_cost_matching(cost.T.tolist())  # each target's query
        iou_rows = iou.T.tolist()
        kept_q, kept_t, kept_iou = [], [], []
        for target, query in enumerate(queries):
            overlap = iou_rows[target][query]
            if overlap >= self.min_iou:
                kept_q.append(query)
                kept_t.append(target)
                kept_iou.append(overlap)
        return kept_q, kept_t, kept_iou

    def __call__(self, cls_scores: torch.Tensor, bbox_preds: torch.Tensor) -> LayerResult:
        """Losses of one layer: ``cls_scores`` (B, Q, C) logits, ``bbox_preds`` (B, Q, 4)."""
        target_scores = torch.zeros_like(cls_scores)
        batch_idx: list[int] = []
        query_idx: list[int] = []
        matched_boxes = []
        for image in range(cls_scores.shape[0]):
            queries, targets, ious = self.match(cls_scores[image], bbox_preds[image], image)
            if not queries:
                continue
            # Label encoding: IoU-aware one-hot at the target's class.
            classes = self.labels[image][targets]
            target_scores[image, queries, classes] = torch.tensor(ious, dtype=cls_scores.dtype)
            batch_idx += [image] * len(queries)
            query_idx += queries
            matched_boxes.append(self.boxes[image][targets])
        num_pos = len(query_idx)

        # reduce_mean(num_pos): every rank normalizes by the mean over the ranks.
        avg = torch.tensor(float(num_pos))
        if dist.is_initialized():
            dist.all_reduce(avg)
            avg = avg / dist.get_world_size()
        normalizer = avg.clamp(min=1.0)

        prob = cls_scores.sigmoid()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            cls_scores, target_scores, reduction="none")
        weight = torch.where(target_scores > 0, target_scores,
                             self.focal_alpha * prob ** self.focal_gamma)
        loss_cls = (bce * weight).sum() / normalizer
        if num_pos:
            pred = bbox_preds[batch_idx, query_idx]
            tgt = torch.cat(matched_boxes)
            loss_l1 = (pred - tgt).abs().sum() / normalizer
            _, giou = pairwise_iou_giou(box_corners(pred), box_corners(tgt))
            loss_giou = (1 - giou.diagonal()).sum() / normalizer
        else:
            loss_l1 = loss_giou = cls_scores.new_zeros(())
        return float(loss_cls), float(loss_l1), float(loss_giou), num_pos


@dataclass(frozen=True)
class DecoderOutputs:
    """One rank's batch: targets and every decoder layer's predictions."""

    loss: LayerLoss
    cls_scores: list[torch.Tensor]  # per layer: (B, Q, C)
    bbox_preds: list[torch.Tensor]  # per layer: (B, Q, 4)

    @classmethod
    def create(cls, layers: int = 6, images: int = 2, queries: int = 300,
               num_classes: int = 20, max_targets: int = 20, seed: int = 0) -> DecoderOutputs:
        """Synthetic but plausible outputs: later layers are closer to the targets.

        ``seed`` picks the batch (one per rank); the layers of a batch differ.
        """
        g = torch.Generator().manual_seed(seed)
        labels, boxes = [], []
        for _ in range(images):
            count = int(torch.randint(max_targets // 2, max_targets + 1, (), generator=g))
            labels.append(torch.randint(0, num_classes, (count,), generator=g))
            center = torch.rand(count, 2, generator=g) * 0.8 + 0.1
            size = torch.rand(count, 2, generator=g) * 0.25 + 0.05
            boxes.append(torch.cat([center, size], dim=1))
        cls_scores, bbox_preds = [], []
        for layer in range(layers):
            noise = 0.12 / (1 + layer)  # refinement: each layer is closer
            score_rows, box_rows = [], []
            for image in range(images):
                logits = torch.randn(queries, num_classes, generator=g) - 2.0
                pred = torch.rand(queries, 4, generator=g) * torch.tensor([1.0, 1.0, 0.3, 0.3])
                count = len(labels[image])
                # The first queries track the targets, with this layer's noise.
                pred[:count] = boxes[image] + noise * torch.randn(count, 4, generator=g)
                pred[:, 2:] = pred[:, 2:].clamp(min=0.02)
                logits[torch.arange(count), labels[image]] += 1.0 + 0.5 * layer
                score_rows.append(logits)
                box_rows.append(pred)
            cls_scores.append(torch.stack(score_rows))
            bbox_preds.append(torch.stack(box_rows))
        return cls(LayerLoss(labels, boxes, num_classes), cls_scores, bbox_preds)
