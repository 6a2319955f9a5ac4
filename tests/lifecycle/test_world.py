"""Which process is global rank 0 under each launcher, and what a rank other than 0 leaves alone.

Under torchrun or SLURM every process runs ``train.py`` itself; only global rank 0 may take the
job's lock and write into the run directory. The rank is read from the launcher's environment
before the Trainer exists; Lightning's Trainer, built in the same environment, is the reference.
"""

from __future__ import annotations

import json

import pytest
from lightning_fabric.utilities.rank_zero import _get_rank
from omegaconf import OmegaConf
from pytorch_lightning import Trainer
from pytorch_lightning.utilities import rank_zero_only

from lifecycle.loggers import build_loggers
from lifecycle.world import RANK_VARIABLES, check_rank, check_world, is_global_zero, world_of

LAUNCH_VARIABLES = (*RANK_VARIABLES, "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID",
                    "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE",
                    "SLURM_JOB_NAME", "SLURM_JOB_ID")  # fmt: skip


def torchrun(node: int) -> dict:  # what torchrun --nnodes 2 --nproc_per_node 1 --node_rank <node> sets
    return {"TORCHELASTIC_RUN_ID": "x", "RANK": node, "LOCAL_RANK": 0, "GROUP_RANK": node, "WORLD_SIZE": 2}


def slurm(node: int) -> dict:  # what srun sets in a 2-node x 1-task allocation
    return {"SLURM_NTASKS": 2, "SLURM_PROCID": node, "SLURM_LOCALID": 0, "SLURM_NODEID": node,
            "SLURM_NNODES": 2, "SLURM_NTASKS_PER_NODE": 1, "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": 7}  # fmt: skip


def by_hand(node: int) -> dict:  # Lightning's own multi-node launch: the first process of each node
    return {"NODE_RANK": node}


def launched(monkeypatch, env: dict) -> None:
    """This process as the launcher would have started it: its environment, and the rank Lightning
    read from it at import."""
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(rank_zero_only, "rank", _get_rank() or 0)  # restored after the test


@pytest.mark.parametrize("launch", [torchrun, slurm, by_hand])
@pytest.mark.parametrize("node", [0, 1])
def test_global_rank_zero_from_the_environment_is_the_trainers(monkeypatch, launch, node):
    launched(monkeypatch, launch(node))
    rank_zero = is_global_zero()
    trainer = Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", logger=False)
    assert (trainer.global_rank, trainer.world_size, trainer.node_rank) == (node, 2, node)
    assert rank_zero == (node == 0) == trainer.is_global_zero
    check_rank(trainer, rank_zero)  # agrees: no refusal
    expected = {
        "torchrun": "TorchElasticEnvironment",
        "slurm": "SLURMEnvironment",
        "by_hand": "LightningEnvironment",
    }
    assert world_of(trainer) == {
        "world_size": 2,
        "num_nodes": 2,
        "devices_per_node": 1,
        "cluster_environment": expected[launch.__name__],
    }


def test_a_trainer_that_disagrees_on_rank_zero_is_refused(monkeypatch):
    from lifecycle.guards import JobRefused

    launched(monkeypatch, torchrun(1))
    trainer = Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", logger=False)
    with pytest.raises(
        JobRefused, match=r"global rank 1 of 2 \(node 1\), but its environment .*RANK=1.* said it is rank 0"
    ):
        check_rank(trainer, True)


def test_only_rank_zero_writes_the_wandb_run_id(compose, tmp_path, monkeypatch):
    cfg = compose(["logger=wandb"])
    for node, job in ((1, tmp_path / "one"), (0, tmp_path / "zero")):
        launched(monkeypatch, torchrun(node))
        job.mkdir()
        build_loggers(cfg, job)
        assert (job / "wandb_id.txt").exists() == (node == 0), node


def test_fresh_on_a_rank_other_than_zero_deletes_nothing_and_neither_reports_nor_resumes(
    compose, tmp_path, monkeypatch, capsys
):
    """rank 0 deletes a fresh run's former files; rank 1, looking at the same directory meanwhile,
    must not report the former result as finished nor resume from its checkpoint, and writes
    nothing. A single-process Trainer then says this process is rank 0: refused."""
    from lifecycle.identity import identity
    from lifecycle.job import run_job

    cfg = compose([f"paths.log_dir={tmp_path}", "fresh=true", "logger=none", "model=mlp"])
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    job = tmp_path / "runs" / "job"
    (job / "checkpoints").mkdir(parents=True)
    finished = {"status": "completed", "config": {}, "identity": identity(task_cfg), "final": {"val/acc": 0.5},
                "wall_time_s": 1.0, "stop_reason": "max_epochs"}  # fmt: skip
    (job / "results.json").write_text(json.dumps(finished))
    (job / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")  # resuming from it would fail
    before = {p: p.read_bytes() for p in job.rglob("*") if p.is_file()}
    launched(monkeypatch, torchrun(1))
    outcome = run_job(task_cfg, job)
    out = capsys.readouterr()
    assert outcome.exit_code == 2
    assert "already finished" not in out.out and "cannot be read" not in out.err
    assert "Lightning made this process global rank 0 of 1" in out.err and "said it is not rank 0" in out.err
    assert {p: p.read_bytes() for p in job.rglob("*") if p.is_file()} == before  # no lock, no record


def test_a_failure_on_a_rank_other_than_zero_is_not_recorded_there(compose, tmp_path, capsys):
    """Under torchrun, another rank fails when rank 0 is refused (e.g. the job's lock is held by a
    running launch, whose record this must leave alone) or dies: it neither writes nor claims to."""
    from lifecycle.job import _failed, _Job

    job = _Job(compose([]), tmp_path, multirun=False, rank_zero=False)
    try:
        raise RuntimeError("the connection to rank 0 closed")
    except RuntimeError as e:
        outcome = _failed(job, e)
    assert outcome.exit_code == 1 and not any(tmp_path.iterdir())
    err = capsys.readouterr().err
    assert (
        "[train] failed: RuntimeError: the connection to rank 0 closed (global rank 0 records the job)" in err
    )


@pytest.mark.parametrize(
    "launch,devices,nodes,message",
    [
        (torchrun, 1, 1, r"the product \(1 \* 1\) does not match the world size \(2\)"),
        (slurm, 2, 2, r"`devices=2` in Lightning, but the number of tasks per node .* `--ntasks-per-node=1`"),
        (slurm, 1, 1, r"`num_nodes=1` in Lightning, but the number of nodes .* `--nodes=2`"),
    ],
)
def test_a_launch_of_another_shape_than_the_config_is_refused(monkeypatch, launch, devices, nodes, message):
    """The Trainer takes the world size from torchrun's or SLURM's environment without comparing it
    with devices x num_nodes; the batch plan would split the global batch the wrong number of ways."""
    from lifecycle.guards import JobRefused

    launched(monkeypatch, launch(1))
    trainer = Trainer(accelerator="cpu", devices=devices, num_nodes=nodes, strategy="ddp", logger=False)
    assert trainer.world_size == 2  # Lightning alone lets it through
    with pytest.raises(JobRefused, match=message):
        check_world(trainer, devices * nodes)


def test_a_world_size_other_than_the_plans_is_refused(monkeypatch):
    """SLURM's per-node and node counts match the config, its task count does not: Lightning's SLURM
    check lets it through, the world size does not."""
    from lifecycle.guards import JobRefused

    launched(monkeypatch, slurm(0))
    trainer = Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", logger=False)
    check_world(trainer, 2)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(
        JobRefused, match=r"started 4 processes \(SLURMEnvironment\), but the config asks for 2 "
    ):
        check_world(trainer, 2)
