"""Everything a job trains with, checked and built before training starts.

One validation path: the settings dataclasses (:mod:`lightning_modules.config`) and every
callback check their own values and raise :class:`ConfigError`; :func:`build_job` builds them
all and reports an error under the key's full config path (``optimizer.lr``,
``callbacks.hessian.k``); :func:`validate` adds the checks that need the whole config (data,
trainer, devices, the batch plan).
"""

from __future__ import annotations

import dataclasses
import math
import os

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from lightning_modules.config import AdversarialTraining, ConfigError, SGDConfig, check
from lightning_modules.data import AUGMENTATIONS, DATASETS
from lightning_modules.module import SGDClassifier


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: per device, then into micro-batches (accumulation)."""

    global_batch: int
    world_size: int
    per_device: int
    micro_batch: int
    accumulate: int


def _settings(cls, section: str, values):
    """``cls(**values)``, a bad value reported under ``section``; an unknown key is named with the
    allowed ones, and a value of the wrong type is a config error rather than a ``TypeError``."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        check(
            key in allowed,
            f"{section}.{key}",
            values[key],
            f"not a setting of {section} (allowed: {', '.join(allowed)})",
        )
    try:
        return cls(**values)
    except ConfigError as e:
        raise e.under(section) from None
    except TypeError as e:  # a comparison of a wrong type the dataclass does not check itself
        raise ConfigError(section, dict(values), f"a value of the wrong type ({e})") from None


def _world_size(cfg: DictConfig) -> int:
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices != "auto" and not devices.isdigit():
        raise ConfigError("trainer.devices", devices, "give a number of devices (e.g. 1, 2)")
    if devices == "auto":
        devices = torch.cuda.device_count() if cfg.trainer.accelerator in ("gpu", "cuda") else 1
    check(int(devices) >= 1, "trainer.devices", devices, "must be >= 1")
    check(isinstance(nodes, int) and nodes >= 1, "trainer.num_nodes", nodes, "must be an integer >= 1")
    return int(devices) * nodes


def validate(cfg: DictConfig, multirun: bool) -> BatchPlan:
    """Check every value that would otherwise fail mid-training; return the batch plan."""
    sgd = _settings(SGDConfig, "optimizer", cfg.optimizer)
    b = sgd.batch_size
    check(cfg.data.name in DATASETS, "data.name", cfg.data.name, f"allowed: {', '.join(DATASETS)}")
    augment = cfg.data.get("augment", "none")
    check(augment in AUGMENTATIONS, "data.augment", augment, f"allowed: {', '.join(AUGMENTATIONS)}")
    t = cfg.trainer
    check(
        t.max_epochs is None or t.max_epochs == -1 or (isinstance(t.max_epochs, int) and t.max_epochs >= 1),
        "trainer.max_epochs",
        t.max_epochs,
        "must be an integer >= 1 (or -1 with max_steps)",
    )
    check(
        t.max_steps == -1 or (isinstance(t.max_steps, int) and t.max_steps >= 1),
        "trainer.max_steps",
        t.max_steps,
        "must be an integer >= 1, or -1 for no step budget",
    )
    check(
        t.max_epochs != -1 or t.max_steps > 0,
        "trainer.max_epochs",
        t.max_epochs,
        "-1 (no epoch cap) needs trainer.max_steps > 0: otherwise the run trains without end",
    )
    _settings(AdversarialTraining, "adversarial_training", cfg.adversarial_training)

    world = _world_size(cfg)
    check(
        b % world == 0,
        "optimizer.batch_size",
        b,
        f"the global batch must split evenly across {world} devices "
        f"(trainer.devices x trainer.num_nodes); "
        f"nearest valid sizes: {b - b % world or world}, {b - b % world + world}",
    )
    strategy = str(t.get("strategy", "auto"))
    under_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    check(
        not (
            multirun
            and world > 1
            and strategy.startswith("ddp")
            and "spawn" not in strategy
            and not under_slurm
        ),
        "trainer.strategy",
        strategy,
        "a local Hydra multirun with plain ddp re-launches the whole sweep in each child process; "
        "use trainer=ddp_spawn locally, or the SLURM launcher (hydra/launcher=slurm trainer=slurm), "
        "where SLURM starts the ranks",
    )
    check(
        not (world > 1 and t.get("sync_batchnorm") and t.accelerator == "cpu"),
        "trainer.sync_batchnorm",
        True,
        "needs GPUs (nn.SyncBatchNorm refuses CPU tensors)",
    )
    per_device = b // world
    max_micro = cfg.get("max_micro_batch")
    check(
        max_micro is None or (isinstance(max_micro, int) and max_micro >= 1),
        "max_micro_batch",
        max_micro,
        "must be a positive integer or null",
    )
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


def build_named_callbacks(cfg: DictConfig) -> dict[str, pl.Callback]:
    """Every configured callback by its name under ``callbacks``; a bad argument is a config error
    under ``callbacks.<name>``."""
    built = {}
    for name, ccfg in (cfg.get("callbacks") or {}).items():
        if ccfg is None:
            continue
        try:
            built[name] = hydra.utils.instantiate(ccfg)
        except InstantiationException as e:
            cause = e.__cause__
            if isinstance(cause, ConfigError):
                raise cause.under(f"callbacks.{name}") from None
            raise ConfigError(f"callbacks.{name}", ccfg.get("_target_"), str(cause or e)) from None
    return built


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Every configured callback (:func:`build_named_callbacks`), in config order."""
    return list(build_named_callbacks(cfg).values())


def check_against_data(
    cfg: DictConfig,
    plan: BatchPlan,
    net: torch.nn.Module,
    datamodule: pl.LightningDataModule,
    callbacks: dict[str, pl.Callback],
) -> None:
    """The checks that need the built model and datamodule, before training: the global batch
    against the training set, the data's own sizes (``data.<key>``), and each callback's
    ``check_against(model, datamodule)`` (``callbacks.<name>.<key>``)."""
    size = getattr(datamodule, "split_size", None)
    if size is not None:
        n = size("train")
        b, world = plan.global_batch, plan.world_size
        fits = n - n % world
        check(
            b <= n,
            "optimizer.batch_size",
            b,
            f"larger than the {n} training images of data={cfg.data.name}: an epoch would be "
            + (
                "no step at all (data.drop_last=true)"
                if cfg.data.get("drop_last")
                else f"one step over {n} images"
            )
            + f"; use at most {fits}",
        )
    check_sizes = getattr(datamodule, "check_sizes", None)
    if check_sizes is not None:
        try:
            check_sizes()
        except ConfigError as e:
            raise e.under("data") from None
    for name, callback in callbacks.items():
        check_callback = getattr(callback, "check_against", None)
        if check_callback is None:
            continue
        try:
            check_callback(net, datamodule)
        except ConfigError as e:
            raise e.under(f"callbacks.{name}") from None


@dataclasses.dataclass
class Job:
    """What one job trains and measures with, built and checked."""

    plan: BatchPlan
    module: SGDClassifier
    datamodule: pl.LightningDataModule
    callbacks: list[pl.Callback]


def build_job(cfg: DictConfig, multirun: bool) -> Job:
    """Check the whole config and build the model, data, LightningModule and callbacks.

    Raises :class:`ConfigError` (or :class:`lightning_modules.data.DataUnavailable`) before
    anything is trained. The initial weights depend on ``cfg.seed`` only.
    """
    plan = validate(cfg, multirun)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg)
    try:
        datamodule = hydra.utils.instantiate(
            cfg.data, batch_size=plan.global_batch, micro_batch_size=plan.micro_batch, seed=cfg.seed
        )
    except InstantiationException as e:  # a value the datamodule refuses (data.on_device)
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__.under("data") from None
        raise
    callbacks = build_named_callbacks(cfg)
    check_against_data(cfg, plan, net, datamodule, callbacks)
    module = SGDClassifier(
        net,
        SGDConfig(**cfg.optimizer),
        AdversarialTraining(**cfg.adversarial_training),
        per_device_batch=plan.per_device,
        micro_batch=plan.micro_batch,
        num_classes=DATASETS[cfg.data.name].num_classes,
    )
    return Job(plan, module, datamodule, list(callbacks.values()))
