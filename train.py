"""Train one classifier with chosen SGD hyperparameters; measure curvature and robustness.

    python train.py                          # LeNet on the embedded MNIST digits, a few minutes on CPU
    python train.py model=c1 optimizer.batch_size=512
    python train.py -m experiment=fixed_lr_small   # a sweep

Every job writes into its own directory (a function of its overrides): the resolved config,
logs, checkpoints and ``results.json`` (status, why it stopped, per-epoch and final metrics,
provenance). Re-running the same command resumes from ``checkpoints/last.ckpt`` or, if the job
already finished, prints its summary; ``fresh=true`` starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import netrc
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from callbacks.run_record import RunRecord, read_record, update_record
from callbacks.wandb_axes import WandbEpochAxis
from lightning_modules.data import AUGMENTATIONS, DATASETS, DataUnavailable
from lightning_modules.models import has_batchnorm
from lightning_modules.module import LR_RULES, SCHEDULES, AdversarialTraining, SGDClassifier, SGDConfig

RECORD = "results.json"
FINISHED = ("completed", "diverged")
FAILED_JOBS: list[str] = []  # jobs of this process that failed (multirun keeps going; exit code says so)


def job_dirname(overrides: str) -> str:
    """Directory name of a job from its override string: readable, filesystem-safe, unique."""
    if not overrides:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", overrides)
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(overrides.encode()).hexdigest()[:10]
    return name


OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)


class ConfigError(ValueError):
    """A config value that cannot work: names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"{key}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: per device, then into micro-batches (accumulation)."""

    global_batch: int
    world_size: int
    per_device: int
    micro_batch: int
    accumulate: int


def _world_size(cfg: DictConfig) -> int:
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices != "auto" and not devices.isdigit():
        raise ConfigError("trainer.devices", devices, "give a number of devices (e.g. 1, 2)")
    if devices == "auto":
        devices = torch.cuda.device_count() if cfg.trainer.accelerator in ("gpu", "cuda") else 1
    if int(devices) < 1:
        raise ConfigError("trainer.devices", devices, "must be >= 1")
    if not isinstance(nodes, int) or nodes < 1:
        raise ConfigError("trainer.num_nodes", nodes, "must be an integer >= 1")
    return int(devices) * nodes


def validate(cfg: DictConfig, multirun: bool) -> BatchPlan:
    """Check every value that would otherwise fail mid-training; return the batch plan."""
    o = cfg.optimizer
    b = o.batch_size
    if not isinstance(b, int) or b <= 0:
        raise ConfigError("optimizer.batch_size", b, "must be a positive integer (the global batch)")
    if o.lr_rule not in LR_RULES:
        raise ConfigError("optimizer.lr_rule", o.lr_rule, f"allowed: {', '.join(LR_RULES)}")
    if o.lr_rule == "fixed" and not (isinstance(o.lr, int | float) and o.lr > 0):
        raise ConfigError("optimizer.lr", o.lr, "must be a number > 0")
    if o.lr_rule == "ratio" and not (isinstance(o.lr_ratio, int | float) and o.lr_ratio > 0):
        raise ConfigError("optimizer.lr_ratio", o.lr_ratio, "must be a number > 0 with lr_rule=ratio")
    if not (isinstance(o.momentum, int | float) and 0 <= o.momentum < 1):
        raise ConfigError("optimizer.momentum", o.momentum, "must be in [0, 1)")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("optimizer.nesterov", o.nesterov, "Nesterov needs momentum > 0")
    if not o.weight_decay >= 0:
        raise ConfigError("optimizer.weight_decay", o.weight_decay, "must be >= 0")
    if o.schedule not in SCHEDULES:
        raise ConfigError("optimizer.schedule", o.schedule, f"allowed: {', '.join(SCHEDULES)}")
    if o.schedule == "step" and not (o.step_epochs > 0 and 0 < o.gamma <= 1):
        raise ConfigError(
            "optimizer.step_epochs/gamma", (o.step_epochs, o.gamma), "need step_epochs > 0, 0 < gamma <= 1"
        )
    if not o.warmup_epochs >= 0:
        raise ConfigError("optimizer.warmup_epochs", o.warmup_epochs, "must be >= 0")
    if cfg.data.name not in DATASETS:
        raise ConfigError("data.name", cfg.data.name, f"allowed: {', '.join(DATASETS)}")
    if cfg.data.get("augment", "none") not in AUGMENTATIONS:
        raise ConfigError("data.augment", cfg.data.augment, f"allowed: {', '.join(AUGMENTATIONS)}")
    t = cfg.trainer
    if not (
        t.max_epochs is None or t.max_epochs == -1 or (isinstance(t.max_epochs, int) and t.max_epochs >= 1)
    ):
        raise ConfigError(
            "trainer.max_epochs", t.max_epochs, "must be an integer >= 1 (or -1 with max_steps)"
        )
    if t.max_steps != -1 and not (isinstance(t.max_steps, int) and t.max_steps >= 1):
        raise ConfigError(
            "trainer.max_steps", t.max_steps, "must be an integer >= 1, or -1 for no step budget"
        )
    a = cfg.adversarial_training
    if a.enabled:
        if a.attack not in ("fgsm", "pgd"):
            raise ConfigError("adversarial_training.attack", a.attack, "allowed: fgsm, pgd")
        if a.norm not in ("linf", "l2"):
            raise ConfigError("adversarial_training.norm", a.norm, "allowed: linf, l2")
        if not a.eps >= 0:
            raise ConfigError("adversarial_training.eps", a.eps, "must be >= 0")
        if not 0 <= a.fraction <= 1:
            raise ConfigError("adversarial_training.fraction", a.fraction, "must be in [0, 1]")
        if a.bn_mode not in ("eval", "train"):
            raise ConfigError("adversarial_training.bn_mode", a.bn_mode, "allowed: eval, train")
        if not (isinstance(a.steps, int) and a.steps >= 1):
            raise ConfigError("adversarial_training.steps", a.steps, "must be an integer >= 1")

    world = _world_size(cfg)
    if b % world:
        raise ConfigError(
            "optimizer.batch_size",
            b,
            f"the global batch must split evenly across {world} devices "
            f"(trainer.devices x trainer.num_nodes); "
            f"nearest valid sizes: {b - b % world or world}, {b - b % world + world}",
        )
    strategy = str(t.get("strategy", "auto"))
    under_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if multirun and world > 1 and strategy.startswith("ddp") and "spawn" not in strategy and not under_slurm:
        raise ConfigError(
            "trainer.strategy",
            strategy,
            "a local Hydra multirun with plain ddp re-launches the whole sweep in each child process; "
            "use trainer=ddp_spawn locally, or the SLURM launcher (hydra/launcher=slurm trainer=slurm), "
            "where SLURM starts the ranks",
        )
    if world > 1 and t.get("sync_batchnorm") and t.accelerator == "cpu":
        raise ConfigError("trainer.sync_batchnorm", True, "needs GPUs (nn.SyncBatchNorm refuses CPU tensors)")
    per_device = b // world
    max_micro = cfg.get("max_micro_batch")
    if max_micro is not None and (not isinstance(max_micro, int) or max_micro < 1):
        raise ConfigError("max_micro_batch", max_micro, "must be a positive integer or null")
    accumulate = 1 if max_micro is None else math.ceil(per_device / max_micro)
    while per_device % accumulate:
        accumulate += 1  # equal micro-batches keep the mean of means equal to the batch mean
    return BatchPlan(b, world, per_device, per_device // accumulate, accumulate)


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """Instantiate the model for the data's input shape; a mismatch is a config error."""
    info = DATASETS[cfg.data.name]
    try:
        net = hydra.utils.instantiate(
            cfg.model,
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            mean=info.mean,
            std=info.std,
        )
        with torch.no_grad():
            out = net.eval()(torch.zeros(2, *info.input_shape))
        net.train()
    except Exception as e:
        raise ConfigError(
            "model",
            cfg.model._target_.rsplit(".", 1)[-1],
            f"does not fit data={cfg.data.name} (input shape {info.input_shape}): {e}",
        ) from None
    if tuple(out.shape) != (2, info.num_classes):
        raise ConfigError(
            "model", cfg.model._target_, f"returns shape {tuple(out.shape)}, expected (N, {info.num_classes})"
        )
    return net


def provenance() -> dict:
    import pytorch_lightning as pl

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:
        commit = ""
    return {
        "git_commit": commit or None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "hydra": hydra.__version__,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch_threads": torch.get_num_threads(),
    }


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_loggers(cfg: DictConfig, out_dir: Path) -> list:
    """The configured loggers plus the run record. W&B never hangs: without credentials (and
    WANDB_MODE unset) it runs offline; its run id is kept in the run dir, so a resumed job
    continues the same W&B run."""
    loggers = []
    for lcfg in (cfg.get("logger") or {}).values():
        if lcfg is None:
            continue
        if lcfg._target_.endswith("WandbLogger"):
            id_file = out_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(
                    hashlib.sha1(f"{out_dir.resolve()}{time.time()}".encode()).hexdigest()[:16]
                )
            extra = {
                "id": id_file.read_text().strip(),
                "resume": "allow",
                "config": OmegaConf.to_container(cfg, resolve=True),
            }
            if not os.environ.get("WANDB_MODE") and not _wandb_has_credentials():
                extra["mode"] = "offline"  # per run: does not leak into later jobs like offline=True does
                print(
                    f"[train] W&B: no credentials found, logging offline. Upload later with:\n"
                    f"    wandb sync {out_dir / 'wandb'}/offline-run-*"
                )
            loggers.append(hydra.utils.instantiate(lcfg, _partial_=True)(**extra))
        else:
            loggers.append(hydra.utils.instantiate(lcfg))
    loggers.append(RunRecord(out_dir / RECORD))
    return loggers


def _finish_wandb() -> None:
    """End this job's W&B run, so the next job of a multirun gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def summarize(record: dict, out_dir: Path) -> str:
    f = record.get("final", {})

    def num(key):
        v = f.get(key)
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [
        f"[train] status: {record.get('status')} (stopped: {record.get('stop_reason')}) "
        f"after {record.get('stopped_at_epoch')} epochs / {record.get('stopped_at_step')} steps, "
        f"{record.get('wall_time_s', 0):.0f} s",
        f"[train] train loss {num('train_eval/loss')}  acc {num('train_eval/acc')}   "
        f"test loss {num('test/loss')}  acc {num('test/acc')}   val acc {num('val/acc')}",
    ]
    hessian = [
        f"{k.removeprefix('hessian/')} {f[k]:.4g}" for k in sorted(f) if k.startswith("hessian/lambda")
    ]
    if "hessian/trace" in f:
        hessian.append(f"trace {f['hessian/trace']:.4g}")
    if hessian:
        lines.append("[train] Hessian: " + "  ".join(hessian))
    attacks: dict[str, list[str]] = {}
    for k in sorted(f, key=lambda k: (k.split("/eps")[0], float(k.split("/eps")[1]) if "/eps" in k else 0)):
        if k.startswith("adv/") and "/eps" in k:
            attack, eps = k.removeprefix("adv/").split("/eps")
            attacks.setdefault(attack, []).append(f"{float(eps):g}:{f[k]:.3f}")
    for attack, values in attacks.items():
        lines.append(f"[train] robust accuracy {attack} (eps:acc) " + " ".join(values))
    lines.append(
        f"[train] run dir: {out_dir}  (config: .hydra/config.yaml, record: {RECORD}, "
        f"checkpoints: checkpoints/, logs: csv/ or wandb/)"
    )
    return "\n".join(lines)


def train(cfg: DictConfig, out_dir: Path, multirun: bool = False) -> float | None:
    """Run (or resume, or skip) one job; returns the final validation accuracy."""
    import pytorch_lightning as pl

    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path = out_dir / RECORD
    rank_zero = _is_rank_zero()
    try:
        plan = validate(cfg, multirun)
        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
        net = build_model(cfg)
        datamodule = hydra.utils.instantiate(
            cfg.data, batch_size=plan.global_batch, micro_batch_size=plan.micro_batch, seed=cfg.seed
        )
        if rank_zero:
            datamodule.prepare_data()  # offline and no files: one clear error, before any training
    except (ConfigError, DataUnavailable) as e:
        if rank_zero:
            update_record(record_path, status="failed", error=str(e), overrides=_overrides())
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            FAILED_JOBS.append(str(out_dir))
            return None
        sys.exit(2)

    if cfg.fresh and rank_zero:
        for p in ("checkpoints", "csv", "wandb", RECORD, "wandb_id.txt"):
            target = out_dir / p
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    previous = read_record(record_path)
    if previous.get("status") in FINISHED and not cfg.fresh:
        print(f"[train] this job already finished ({previous['status']}); fresh=true trains it again.")
        print(summarize(previous, out_dir))
        return previous.get("final", {}).get("val/acc")
    last_ckpt = out_dir / "checkpoints" / "last.ckpt"
    resume = last_ckpt if last_ckpt.exists() and not cfg.fresh else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if rank_zero:
        update_record(
            record_path,
            status="running",
            overrides=_overrides(),
            config=OmegaConf.to_container(cfg, resolve=True),
            batch_plan=dataclasses.asdict(plan),
            provenance=provenance(),
            resumed_from=str(resume) if resume else None,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            error=None,
        )
        if resume:
            print(f"[train] resuming from {resume}")

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = SGDClassifier(
        net,
        SGDConfig(**cfg.optimizer),
        AdversarialTraining(**cfg.adversarial_training),
        per_device_batch=plan.per_device,
        micro_batch=plan.micro_batch,
        num_classes=DATASETS[cfg.data.name].num_classes,
    )
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = build_loggers(cfg, out_dir)
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        callbacks.append(WandbEpochAxis())
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        accumulate_grad_batches=plan.accumulate,
        use_distributed_sampler=False,
        default_root_dir=str(out_dir),
    )
    if plan.world_size > 1 and not cfg.trainer.sync_batchnorm and has_batchnorm(net) and rank_zero:
        print(
            f"[train] note: BatchNorm uses per-device statistics over {plan.micro_batch} samples "
            f"(no SyncBatchNorm on this run); the global batch is {plan.global_batch}."
        )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
        trainer.validate(module, datamodule=datamodule, verbose=False)  # final metrics, all eval sets
    finally:
        _finish_wandb()
    if not rank_zero:
        return None
    record = read_record(record_path)
    # the latest value of everything logged (measurements too), then the final evaluation
    final = {
        **record.get("last", {}),
        **{k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }
    status = "diverged" if record.get("stop_reason") == "diverged" else "completed"
    record = update_record(record_path, status=status, final=final, wall_time_s=time.time() - start)
    print(summarize(record, out_dir))
    return final.get("val/acc")


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    return train(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    main()
    if FAILED_JOBS:
        print(f"[train] {len(FAILED_JOBS)} job(s) failed: " + ", ".join(FAILED_JOBS), file=sys.stderr)
        sys.exit(1)
