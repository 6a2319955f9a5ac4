"""Which process is which: global rank 0 decided from the launcher's environment, and the world
Lightning found.

Under torchrun or SLURM every process runs ``train.py`` (Hydra, the job's checks, the Trainer)
itself; only global rank 0 takes the job's lock and writes into the run directory. That must be
known before the Trainer exists (the lock comes first), so :func:`is_global_zero` reads the
launcher's environment, and :func:`check_rank` compares it with the Trainer's answer.
"""

from __future__ import annotations

import os

from pytorch_lightning.utilities import rank_zero_only

from lifecycle.guards import JobRefused

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
"""Where launchers put a process's rank, in the order Lightning reads them (``rank_zero_only.rank``)."""


def is_global_zero() -> bool:
    """Whether this process is global rank 0, from its environment, before the Trainer exists.

    A launcher puts the rank into the environment and Lightning reads it at import into
    ``rank_zero_only.rank``: ``RANK`` (torchrun), ``LOCAL_RANK`` (the processes plain ``ddp``
    starts), ``SLURM_PROCID`` (SLURM). A process with none of them that Lightning itself makes the
    first process of node N (a multi-node ``ddp`` run started by hand with ``NODE_RANK=N``) is
    global rank 0 only on node 0.
    """
    if getattr(rank_zero_only, "rank", 0) != 0:
        return False
    if any(key in os.environ for key in RANK_VARIABLES):
        return True
    return int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))) == 0


def check_world(trainer, world_size: int) -> None:
    """Refuse a launch of another shape than the config's: ``trainer.devices`` processes on each
    of ``trainer.num_nodes`` nodes, ``world_size`` in all (the batch plan splits the global batch
    that many ways).

    Under torchrun or SLURM the Trainer takes the world size from the launcher's environment and
    does not compare it with ``devices`` and ``num_nodes`` (its cluster environments'
    ``validate_settings`` run only when Lightning starts the processes itself): a mismatch would
    train with another global batch, silently. So the cluster environment's own check runs here,
    and the world size is compared whatever the environment."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is not None:
        try:
            env.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
        except ValueError as e:
            raise JobRefused(f"trainer: {e} ({type(env).__name__})") from None
    if trainer.world_size != world_size:
        raise JobRefused(
            f"the launcher started {trainer.world_size} processes ({type(env).__name__}), but the config "
            f"asks for {world_size} (trainer.devices x trainer.num_nodes): the global batch would be split "
            f"{world_size} ways on {trainer.world_size} processes. Set trainer.devices (processes per node) "
            "and trainer.num_nodes to the launch."
        )


def check_rank(trainer, rank_zero: bool) -> None:
    """Refuse a job whose Trainer places this process at another rank than :func:`is_global_zero`
    said (a launch it misread would have two writers or none)."""
    if trainer.is_global_zero == rank_zero:
        return
    found = [f"{k}={os.environ[k]}" for k in (*RANK_VARIABLES, "NODE_RANK", "GROUP_RANK") if k in os.environ]
    raise JobRefused(
        f"Lightning made this process global rank {trainer.global_rank} of {trainer.world_size} "
        f"(node {trainer.node_rank}), but its environment ({', '.join(found) or 'no rank variable'}) "
        f"said it is{'' if rank_zero else ' not'} rank 0. Start the processes with their rank in the "
        "environment: torchrun (RANK) or SLURM's srun (SLURM_PROCID); see docs/scale_out.md."
    )


def world_of(trainer) -> dict:
    """The processes a run trains on, as Lightning found them: world size, nodes, processes per
    node, the cluster environment (``TorchElasticEnvironment``, ``SLURMEnvironment``, ...)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return {
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "devices_per_node": trainer.num_devices,
        "cluster_environment": type(env).__name__ if env is not None else None,
    }


def describe_process(trainer) -> str:
    """This process's place in the world, one line (printed by every process of a multi-process run)."""
    world = world_of(trainer)
    return (
        f"[train] process: global rank {trainer.global_rank} of {trainer.world_size}, node "
        f"{trainer.node_rank} of {trainer.num_nodes}, local rank {trainer.local_rank} "
        f"({world['cluster_environment']})"
    )
