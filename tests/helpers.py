"""What the tests share: running train.py as a user does, a gloo process group, small references.

- :func:`run_train`, :func:`records`: ``python train.py ARGS`` as a real subprocess into a
  temporary log directory, and the ``results.json`` records it wrote;
- :func:`run_in_process_group`: a function on an N-process gloo group on CPU, as torchmetrics'
  tests do (``fn(rank, world_size, *args)``, a module-level function; its return value comes back
  per rank);
- :func:`exact_hessian`: the dense Hessian of a model's loss by ``torch.autograd.functional``
  (an independent route: no HVP or Lanczos code of ours);
- :func:`small_cnn`, :func:`attack_data`: the BatchNorm CNN and inputs of the attack tests.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
# Small, fast runs: no loggers but the record, no progress bar.
FAST = ["logger=none", "trainer.enable_progress_bar=false"]
# ...and no measurement callbacks.
NO_MEASURE = [*FAST, "~callbacks.hessian", "~callbacks.adversarial"]


# ---- train.py as a subprocess ------------------------------------------------------------------
def run_train(
    args: list[str], log_dir: Path, *, env: dict | None = None, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` with runs written under ``log_dir``; output captured."""
    full_env = {**os.environ, "SGD_LOG_DIR": str(log_dir), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        raise AssertionError(f"train.py {' '.join(args)} exited {proc.returncode}\n{tail}")
    return proc


def records(log_dir: Path) -> dict[str, dict]:
    """results.json of every job under ``log_dir``, keyed by the job directory name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(log_dir).rglob("results.json"))}


# ---- a gloo process group ----------------------------------------------------------------------
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


def wall_clock(key: str) -> bool:
    """A metric that is a time, not a result (eval/seconds, hessian/seconds, hessian/hvp_ms_<mode>):
    left out where runs are compared."""
    return key.endswith("/seconds") or "/hvp_ms_" in key


# ---- references and small models ---------------------------------------------------------------
def exact_hessian(model, loss_fn, x, y) -> torch.Tensor:
    """Dense Hessian of the mean loss over all samples w.r.t. the flat trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(theta):
        params, offset = {}, 0
        for name, p in named:
            params[name] = theta[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat).detach()


def small_cnn(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
    ).to(dtype)
    # Non-trivial BatchNorm running statistics and affine parameters.
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.1, 0.1)
    return model.eval()


def attack_data(n: int = 48, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 12, 12, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y
