"""Multi-node runs on one machine: two "nodes" of one CPU process each (gloo), started by torchrun,
with the environment SLURM gives a 2-node x 1-task allocation (``srun`` absent), or by Lightning
itself (``NODE_RANK`` on each node), through ``train.py`` as a user starts it.

Lightning finds the world in the launcher's environment (each process prints its rank, the record
keeps the world of each segment); everything in the run directory is written once, by global rank
0: the same files as a 1-process run's plus one W&B offline run; the numbers are the 1-process
run's (float64: final weights, the record's final metrics and Hessian eigenvalues). A job killed on
both nodes after a mid-epoch checkpoint and started again with the same command resumes as one
run. See docs/scale_out.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, free_port, records, run_train, wall_clock

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 8  # 4,000 digits / 500
COMMON = [
    "model=mlp",
    "model.hidden=[32]",
    "threads=1",
    "trainer.precision=64-true",
    "trainer.max_epochs=2",
    "optimizer.batch_size=500",
    "~callbacks.adversarial",
    "callbacks.hessian.subset_size=101",
    "callbacks.hessian.k=2",
    "trainer.enable_progress_bar=false",
    "callbacks.hessian.hvp=double_backward",
]  # fmt: skip  (auto's choice follows the timings)
SHAPES = {
    "torchrun": ["trainer=multi_node_cpu"],
    "lightning": ["trainer=multi_node_cpu"],
    "slurm": ["trainer=slurm", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
              "trainer.sync_batchnorm=false"],
}  # fmt: skip
ENVIRONMENT = {
    "torchrun": "TorchElasticEnvironment",
    "slurm": "SLURMEnvironment",
    "lightning": "LightningEnvironment",
}
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID",
                    "MASTER_ADDR", "MASTER_PORT")  # fmt: skip
# Keys of ``final`` that differ between 1 and 2 processes by design (as in test_measurements_in_training)
PER_PROCESS = {"opt/per_device_batch", "opt/micro_batch", "train/loss_step"}


def slurm_env(node: int, port: int) -> dict:
    """What SLURM sets for task ``node`` of a 2-node x 1-task allocation (and the address of node 0)."""
    return {"SLURM_NTASKS": "2", "SLURM_PROCID": str(node), "SLURM_LOCALID": "0", "SLURM_NODEID": str(node),
            "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train",
            "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip


def launch(shape: str, args: list[str], log_dir: Path, out: Path) -> list[subprocess.Popen]:
    """Both nodes' launches of ``train.py ARGS``, each in its own process group, output in ``out``."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    base.update(SGD_LOG_DIR=str(log_dir), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    procs = []
    for node in (0, 1):
        if shape == "torchrun":
            torchrun = Path(sys.executable).parent / "torchrun"
            cmd = [str(torchrun), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), "train.py", *args]  # fmt: skip
            env = base
        elif shape == "slurm":
            cmd, env = [sys.executable, "train.py", *args], {**base, **slurm_env(node, port)}
        else:  # Lightning's own launch: on each node, its rank and the address of node 0
            rendezvous = {"NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            cmd, env = [sys.executable, "train.py", *args], {**base, **rendezvous}
        with open(out / f"node{node}.out", "w") as f:
            procs.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every process of the launches (the launcher, its worker, W&B's service process)."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def run_nodes(shape: str, args: list[str], log_dir: Path, out: Path, timeout: float = 300) -> list[str]:
    """Both nodes to the end; their output. Both must exit 0."""
    out.mkdir(parents=True, exist_ok=True)
    procs = launch(shape, args, log_dir, out)
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        kill(procs)
    texts = [(out / f"node{n}.out").read_text() for n in (0, 1)]
    assert codes == [0, 0], f"exit statuses {codes}\n" + "\n".join(
        f"--- node {n}:\n{t[-4000:]}" for n, t in enumerate(texts)
    )
    return texts


def job_files(job: Path) -> set[str]:
    """What a job left in its directory, without the logger's files (the 1-process run has none)."""
    return {
        str(p.relative_to(job))
        for p in job.rglob("*")
        if p.is_file() and p.relative_to(job).parts[0] not in ("wandb", "wandb_id.txt")
    }


def weights(job: Path) -> dict:
    return torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)


def assert_same_run(rec: dict, ckpt: dict, one: dict, ckpt_one: dict) -> None:
    """The multi-node run trained and measured what the 1-process run did."""
    assert ckpt["global_step"] == ckpt_one["global_step"] == 2 * STEPS_PER_EPOCH
    state, state_one = ckpt["state_dict"], ckpt_one["state_dict"]
    assert state.keys() == state_one.keys() and state["net.body.1.weight"].dtype == torch.float64
    for k in state:
        assert torch.allclose(state[k], state_one[k], rtol=0, atol=1e-9), k
    assert rec["status"] == "completed" and rec["stop_reason"] == "max_epochs"
    assert rec["batch_plan"]["world_size"] == 2 and rec["batch_plan"]["per_device"] == 250
    compared = {k for k in {*one["final"], *rec["final"]} if not wall_clock(k)} - PER_PROCESS
    assert {"hessian/lambda_1", "hessian/lambda_2", "test/loss", "val/acc", "train_eval/loss"} <= compared
    differ = {
        k: (one["final"].get(k), rec["final"].get(k))
        for k in sorted(compared)
        if k not in one["final"]
        or k not in rec["final"]
        or abs(one["final"][k] - rec["final"][k]) > 1e-6 * max(1.0, abs(one["final"][k]))
    }
    assert not differ, f"final differs from the 1-process run's (1 process, 2 nodes): {differ}"
    assert [r["epoch"] for r in rec["history"] if "train/loss" in r] == [0, 1]  # each epoch once


def wandb_runs(job: Path) -> tuple[list[Path], str]:
    return sorted((job / "wandb").glob("offline-run-*")), (job / "wandb_id.txt").read_text().strip()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run on one process: its record, final checkpoint and files."""
    log = tmp_path_factory.mktemp("one")
    run_train([*COMMON, "logger=none"], log)
    ((name, rec),) = records(log).items()
    job = log / "runs" / name
    return rec, weights(job), job_files(job)


@pytest.mark.parametrize("shape", ["torchrun", "slurm", "lightning"])
def test_two_nodes_write_one_run_with_the_numbers_of_one_process(tmp_path, one_process, shape):
    one, ckpt_one, files_one = one_process
    log = tmp_path / "log"
    texts = run_nodes(shape, [*COMMON, *SHAPES[shape], "logger=wandb"], log, tmp_path / "out")
    for node, text in enumerate(texts):  # Lightning's own rank, node and world size, per process
        assert (
            f"[train] process: global rank {node} of 2, node {node} of 2, local rank 0 ({ENVIRONMENT[shape]})"
            in text
        )
        assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/2" in text
    assert "[train] status: completed" in texts[0] and "[train] status" not in texts[1]  # rank 0 reports
    (job,) = (log / "runs").iterdir()  # one run directory
    (rec,) = records(log).values()
    (segment,) = rec["segments"]  # rank 1 opened no segment of its own
    world = {
        "world_size": 2,
        "num_nodes": 2,
        "devices_per_node": 1,
        "cluster_environment": ENVIRONMENT[shape],
    }
    assert segment["world"] == world
    assert job_files(job) == files_one  # record, lock, checkpoints, .hydra: as one process writes them
    runs, run_id = wandb_runs(job)
    assert len(runs) == 1 and runs[0].name.endswith(f"-{run_id}")  # one W&B run, by rank 0
    assert_same_run(rec, weights(job), one, ckpt_one)


def test_job_killed_on_both_nodes_mid_epoch_resumes_as_one_run(tmp_path, one_process):
    """SLURM's shape (a requeued job starts the same command on the same nodes): rank 0 is killed
    (SIGKILL, ``fault``) after step 12 of 16, when ``last.ckpt`` holds step 9, inside the second
    epoch; then every process of the job. The same command (``fault`` is not part of it) resumes."""
    one, ckpt_one, _ = one_process
    log = tmp_path / "log"
    args = [*COMMON, *SHAPES["slurm"], "logger=wandb", "callbacks.checkpoint_interval.every_n_train_steps=3"]
    (tmp_path / "killed").mkdir()
    procs = launch("slurm", [*args, "fault=SIGKILL@batch:12"], log, tmp_path / "killed")
    try:
        assert procs[0].wait(timeout=300) == -signal.SIGKILL
    finally:
        kill(procs)
    (job,) = (log / "runs").iterdir()
    (rec,) = records(log).values()
    killed_at = weights(job)["global_step"]
    assert rec["status"] == "running" and STEPS_PER_EPOCH < killed_at < 12

    texts = run_nodes("slurm", args, log, tmp_path / "rerun")
    assert f"resuming from {job / 'checkpoints' / 'last.ckpt'} (step {killed_at})" in texts[0]
    (rec,) = records(log).values()
    assert [s["ended"] for s in rec["segments"]] == ["killed", "completed"]
    assert [s["from_step"] for s in rec["segments"]] == [0, killed_at]
    assert all(s["world"]["world_size"] == 2 for s in rec["segments"])
    assert_same_run(rec, weights(job), one, ckpt_one)
    runs, run_id = wandb_runs(job)  # one W&B run: each segment's offline log carries its id
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
