"""Run a function in N CPU processes joined by a gloo process group (``torch.multiprocessing`` spawn).

``run_group(fn, tmp_path, *args)`` starts ``world_size`` processes; process ``r`` initializes
``torch.distributed`` (gloo, ``file://`` rendezvous in ``tmp_path``, one intra-op thread so that every
process computes exactly like the others), calls ``fn(rank, world_size, *args)`` and saves what it
returns (tensors, numbers, strings, lists and dicts of them) with ``torch.save``; the parent loads it
with ``weights_only=True``. A process that raises fails the test with its traceback; a group that
does not finish within ``timeout`` seconds is killed.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_group", "error_of"]


def _worker(rank: int, world_size: int, tmp: str, fn: Any, args: tuple[Any, ...]) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    if Path("/sys/class/net/lo").exists():  # all processes on this host: talk over loopback (containers)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),  # a hang fails the group instead of blocking CI
    )
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, f"{tmp}/result_{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_group(fn: Any, tmp_path: Path, *args: Any, world_size: int = 2, timeout: float = 240.0) -> list[Any]:
    """``[fn(0, world_size, *args), ...]``, each computed in its own process of one gloo group."""
    tmp = Path(tmp_path) / "group"
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(
        _worker, args=(world_size, str(tmp), fn, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the process group did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"result_{r}.pt", weights_only=True) for r in range(world_size)]


def error_of(call: Any) -> dict[str, str] | None:
    """Run ``call()``; ``{"type", "message"}`` of what it raised (None if nothing)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - reported to the parent as data
        return {"type": type(e).__name__, "message": str(e)}
    return None
