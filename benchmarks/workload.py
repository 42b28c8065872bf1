"""The workload of the demo and benchmarks: the loop body users want on threads.

Each item: 10 x (``h @ wa``, relu, ``h @ wb``, relu) on 256x256 tensors, then a
pure-Python loop of 16,000 iterations, then a scalar ``all_reduce`` of
``(h @ wc).sum()``. The result reveals any cross-item or cross-rank mix-up:
it depends on the item's own input and on every rank's contribution for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Workload:
    wa: torch.Tensor
    wb: torch.Tensor
    wc: torch.Tensor
    size: int
    python_iters: int
    layers: int
    collective: bool

    @classmethod
    def create(cls, size: int = 256, python_iters: int = 16_000, layers: int = 10,
               collective: bool = True, device: str = "cpu") -> Workload:
        g = torch.Generator().manual_seed(0)
        scale = size ** -0.5

        def weight() -> torch.Tensor:
            return (torch.randn(size, size, generator=g) * scale).to(device)

        return cls(weight(), weight(), weight(), size, python_iters, layers, collective)

    def item_input(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + index)
        x = torch.randn(self.size, self.size, generator=g)
        return x.to(self.wa.device)

    def __call__(self, x: torch.Tensor) -> float:
        h = x
        for _ in range(self.layers):
            h = torch.relu(h @ self.wa)
            h = torch.relu(h @ self.wb)
        acc = 0
        for i in range(self.python_iters):  # CPU-side Python work, GIL-bound on GIL builds
            acc += i * i % 7
        loss = (h @ self.wc).sum() + acc * 1e-9
        if self.collective:
            # Every rank adds its rank-dependent share: a mismatched pairing of
            # items across ranks gives a different sum.
            loss = loss * (dist.get_rank() + 1)
            dist.all_reduce(loss)
        return float(loss)
