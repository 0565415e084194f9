"""Run a function on N local gloo ranks (tests, benchmarks): torch.multiprocessing.spawn on
127.0.0.1 with a free port, one torch thread per rank."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_local(fn, world: int, *args, threads: int = 1, start_method: str = "fork") -> None:
    """fn(rank, world, *args) on `world` processes; a failure on any rank raises here.

    "fork" by default: the children inherit the imported torch and moekit instead of importing
    them again (spawn: ~5 s per rank on a loaded 2-core host, against ~0.1 s), and run one thread
    each, so no OpenMP pool crosses the fork. Use "spawn" when the parent has touched CUDA."""
    mp.start_processes(_entry, args=(fn, world, free_port(), threads, args), nprocs=world, join=True,
                       start_method=start_method)
