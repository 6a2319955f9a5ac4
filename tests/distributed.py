"""Run a function on a 2-process (or N-process) gloo group on CPU, as torchmetrics' tests do.

``fn(rank, world_size, *args)`` must be a module-level function (it is pickled into
spawned processes); its return value (tensors, numbers, dicts) comes back per rank.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # plain pickle (tensors by value): shared-memory handles die with this process
        queue.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report to the parent instead of hanging it
        queue.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_in_process_group(fn, *args, world_size: int = 2, timeout: float = 300.0) -> list:
    """Results of ``fn`` on each rank, in rank order; raises if any rank failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if queue.empty():
            if time.monotonic() > deadline or not any(p.is_alive() for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError(
                    f"distributed workers did not all report within {timeout:.0f} s (out of step?)"
                )
            time.sleep(0.05)
            continue
        rank, ok, value = queue.get()
        if ok:
            results[rank] = pickle.loads(value)
        else:
            errors.append(f"rank {rank}:\n{value}")
    for p in procs:
        p.join(timeout)
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
