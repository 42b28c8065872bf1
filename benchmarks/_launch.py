"""Start the ranks of a benchmark: under torchrun, or spawned here on one machine."""

from __future__ import annotations

import os
import socket
import sys
import sysconfig
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def interpreter_summary() -> str:
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    return (
        f"Python {sys.version.split()[0]}{'t' if free_threaded else ''} "
        f"(GIL {'enabled' if gil else 'disabled'}), torch {torch.__version__}, "
        f"{os.cpu_count()} cores"
    )


def gil_enabled() -> bool:
    return sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str,
               body: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        body(*args)
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, backend: str, body: Callable[..., Any], *args: Any) -> None:
    """Run ``body(*args)`` on every rank with the default process group set up.

    Under torchrun (``RANK`` set) this process is one rank and ``world_size`` is
    ignored; otherwise ``world_size`` processes are spawned on this machine.
    """
    if "RANK" in os.environ:
        dist.init_process_group(backend)
        try:
            body(*args)
        finally:
            dist.destroy_process_group()
        return
    mp.spawn(_rank_main, args=(world_size, _free_port(), backend, body, args),
             nprocs=world_size, join=True)
