"""The LightningModule: a classifier and the SGD hyperparameters it is trained with.

Learning rate: given directly (``lr_rule="fixed"``) or as a ratio to the global batch size
(``lr_rule="ratio"``: lr = lr_ratio × batch_size, paper A's constant-ratio experiments).
Schedules: ``constant``, ``step`` (× ``gamma`` every ``step_epochs`` epochs: paper B halves every
5), ``cosine`` (to 0 at the last step), each with an optional linear warmup; the factor is
updated every optimizer step from the fractional epoch. Logged at each epoch end: the
effective lr, momentum, global batch, per-device batch and micro-batch (what BatchNorm sees).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn

from lightning_modules.config import AdversarialTraining, SGDConfig
from lightning_modules.data import restore_loader_states
from measures.attacks import AttackSpec, adversarial_examples
from measures.batch_schedule import adversarial_count


def _writes_a_row(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes a row of step metrics after this training batch (its own rule, read
    from its logger connector; True if that is ever absent, which only costs time)."""
    connector = getattr(trainer, "_logger_connector", None)
    return getattr(connector, "should_update_logs", True)


def log_rank_identical(pl_module: pl.LightningModule, metrics: dict, **kwargs) -> None:
    """``pl_module.log_dict(metrics, sync_dist=False)`` for values that are already the same on every
    rank (reduced by hand, by torchmetrics, or computed from all-reduced products).

    Lightning recommends ``sync_dist=True`` for every epoch-level value under DDP; averaging equal
    values again is not always bitwise equal to them (a mean over 3 ranks rounds), so these are
    logged as they are and Lightning's recommendation is silenced for exactly these names.
    """
    for name in metrics:
        warnings.filterwarnings(
            "ignore",
            message=rf"It is recommended to use `self\.log\({re.escape(repr(name))}, \.\.\., sync_dist=True\)`",
        )
    pl_module.log_dict(metrics, sync_dist=False, **kwargs)


class SGDClassifier(pl.LightningModule):
    """A classifier ``net`` trained by SGD with the settings of :class:`SGDConfig`.

    Args:
        net: the network (normalization inside; inputs in [0, 1] pixel space).
        sgd: SGD's hyperparameters; ``adversarial``: adversarial training, off by default.
        per_device_batch / micro_batch: what one device sees per step / per forward pass
            (recorded; the sampler does the split).
        num_classes: for the accuracy metrics.

    Logs at each epoch end: ``train/loss``, ``train/acc`` (the epoch's training samples, all
    ranks), ``opt/lr``, ``opt/momentum``, ``opt/batch_size`` (the batch in use: grown under ABS),
    ``opt/per_device_batch``,
    ``opt/micro_batch``; after each validation ``{val,test,train_eval}/{loss,acc}`` and
    ``gen_gap/{acc,loss}`` and ``eval/seconds`` (this rank's time in the evaluation loop); every
    ``log_every_n_steps`` steps ``train/loss_step``.
    """

    def __init__(
        self,
        net: nn.Module,
        sgd: SGDConfig,
        adversarial: AdversarialTraining | None = None,
        per_device_batch: int | None = None,
        micro_batch: int | None = None,
        num_classes: int = 10,
    ):
        super().__init__()
        self.net = net
        self.sgd = sgd
        self.adv = adversarial or AdversarialTraining()
        self.per_device_batch = per_device_batch or sgd.batch_size
        self.micro_batch = micro_batch or self.per_device_batch
        self.loss_fn = nn.CrossEntropyLoss()
        self.save_hyperparameters(
            {  # plain values only: checkpoints load with weights_only=True
                "sgd": dataclasses.asdict(sgd),
                "adversarial_training": dataclasses.asdict(self.adv),
                "effective_lr": sgd.effective_lr,
                "per_device_batch": self.per_device_batch,
                "micro_batch": self.micro_batch,
                "num_classes": num_classes,
            }
        )
        # running [sum of losses x samples, correct, samples] of this epoch (cheaper than metrics per
        # step). A plain attribute, not a buffer: DDP would overwrite buffers with rank 0's values.
        self.train_sums = torch.zeros(3, dtype=torch.float64)
        self.eval_loss = nn.ModuleList(torchmetrics.MeanMetric() for _ in range(3))
        self.eval_acc = nn.ModuleList(
            torchmetrics.Accuracy(task="multiclass", num_classes=num_classes) for _ in range(3)
        )
        self.eval_names = ("val", "test", "train_eval")
        # Hooks of callbacks.adaptive_batch (ABS / ABSA): a multiplier of the lr on top of the
        # schedule (saved in checkpoints), and FGSM training of the first ⌊ratio · len(micro-batch)⌋
        # samples of each micro-batch (``adv_schedule``: an AdversarialTraining with that ratio as
        # its fraction; None: the run's own ``adversarial`` setting).
        self.batch_lr_scale = 1.0
        self.adv_schedule: AdversarialTraining | None = None

    def setup(self, stage: str) -> None:
        self._own_state()
        # Lightning restores a checkpoint's weights before its precision plugin converts the
        # module (Trainer._run): a "64-true" run resumed into float32 parameters would lose its
        # weights' low bits, so the module is made float64 first.
        if str(self.trainer.precision).startswith("64"):
            self.double()

    def _own_state(self) -> None:
        """Give this process its own copy of every tensor that is neither parameter nor buffer.

        ``ddp_spawn`` pickles the module into its workers through ``torch.multiprocessing``, which
        moves every CPU tensor it sends into shared memory, the parent's included. Lightning copies
        parameters and buffers back out (``_disable_module_memory_sharing``), not torchmetrics'
        states nor plain attributes: ``MeanMetric`` adds in place (``mean_value +=``), so the ranks
        and the parent summed into one storage until the first ``reset()``. The parent then kept
        the first evaluation of ``fit``, and the final ``trainer.validate()`` (new workers, same
        storage) averaged the final losses with those of epoch 1 (``Accuracy`` adds out of place
        and was right). Evaluation metrics start from nothing here; the other tensors keep their
        values in memory of their own.
        """
        for metric in (*self.eval_loss, *self.eval_acc):
            metric.reset()  # every state a fresh copy of its default
        self.train_sums = self.train_sums.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # ---- training -------------------------------------------------------------------------
    def _adversarial_batch(
        self, x: torch.Tensor, y: torch.Tensor, batch_idx: int, adv: AdversarialTraining | None = None
    ) -> torch.Tensor:
        """Replace the first ``fraction`` of the batch by adversarial examples, made in ``bn_mode``:
        ``round(fraction · len)`` of them for the run's setting, ``⌊fraction · len⌋`` for the
        adaptive batch's schedule (``adv``, the authors' ``int()``)."""
        adv = adv or self.adv
        if adv is self.adv:
            n_adv = round(adv.fraction * len(x))
        else:
            n_adv = adversarial_count(adv.fraction, len(x))
        if n_adv == 0:
            return x
        spec = AttackSpec(
            name=adv.attack,
            eps=adv.eps,
            norm=adv.norm,
            steps=adv.steps,
            step_size=adv.step_size,
            random_start=adv.attack == "pgd",
        )
        was_training = self.net.training
        self.net.train(adv.bn_mode == "train")
        seed = (self.global_step * 1_000_003 + batch_idx) * 4096 + self.global_rank  # fresh per micro-batch
        g = torch.Generator(device=x.device).manual_seed(seed)
        x_adv = adversarial_examples(self.net, x[:n_adv], y[:n_adv], spec, generator=g)
        self.net.train(was_training)
        return torch.cat([x_adv, x[n_adv:]])

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.adv_schedule is not None:
            x = self._adversarial_batch(x, y, batch_idx, self.adv_schedule)
        elif self.adv.enabled:
            x = self._adversarial_batch(x, y, batch_idx)
        logits = self.net(x)
        loss = self.loss_fn(logits, y)
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum()
            n = torch.full_like(correct, len(y))
            self.train_sums = self.train_sums.to(loss.device) + torch.stack(
                [loss.detach() * len(y), correct, n]
            )
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # train/loss_step is logged for exactly the batches whose row Lightning writes next (every
        # log_every_n_steps optimizer steps, or when a callback has just set should_stop), with this
        # batch's loss: the row takes the latest logged value, so logging at batch_idx % n == 0 wrote
        # a stale loss (batch 10's at step 19) and nothing after a mid-epoch resume, and logging every
        # batch cost the loop ~15% of a LeNet step on a CPU (benchmarks/lightning_overhead.py). This
        # hook runs after the callbacks' on_train_batch_end and before Lightning writes the row.
        if _writes_a_row(self.trainer):
            self.log("train/loss_step", outputs["loss"].detach(), on_step=True, on_epoch=False, prog_bar=True)

    def on_train_start(self) -> None:
        restore_loader_states(self.trainer)  # resumed inside an epoch: at the exact batch

    def on_train_epoch_end(self) -> None:
        opt = self.optimizers()
        group = (opt.optimizer if hasattr(opt, "optimizer") else opt).param_groups[0]
        loss_sum, correct, n = self.trainer.strategy.reduce(self.train_sums, reduce_op="sum")
        self.train_sums = torch.zeros_like(self.train_sums)
        log_rank_identical(
            self,
            {
                "train/loss": loss_sum / n,  # mean over this epoch's training samples, all ranks
                "train/acc": correct / n,
                "opt/lr": group["lr"],
                "opt/momentum": group["momentum"],
                "opt/batch_size": self.batch_in_use(),
                "opt/per_device_batch": float(self.per_device_batch),
                "opt/micro_batch": float(self.micro_batch),
            },
        )

    def batch_in_use(self) -> float:
        """The global batch of this epoch's optimizer steps: micro × accumulation × devices, i.e.
        ``optimizer.batch_size`` unless the accumulation was changed since (ABS grows it); written
        as ``batch_size × accumulation / planned accumulation`` (the plan: per-device / micro)."""
        planned = self.per_device_batch / self.micro_batch
        return float(self.sgd.batch_size * self.trainer.accumulate_grad_batches / planned)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # this epoch's running sums over all ranks (every rank saves; a collective on a copy), so a
        # run resumed inside the epoch reports train/loss and train/acc over the whole epoch
        checkpoint["train_sums"] = self.trainer.strategy.reduce(
            self.train_sums.clone(), reduce_op="sum"
        ).cpu()
        checkpoint["batch_lr_scale"] = self.batch_lr_scale

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batch_lr_scale = float(checkpoint.get("batch_lr_scale", 1.0))
        sums = checkpoint.get("train_sums")
        trainer = self._trainer
        if sums is not None and (trainer is None or trainer.global_rank == 0):
            self.train_sums = sums.to(self.train_sums)  # the other ranks start from zero

    # ---- evaluation: dataloader 0 = val, 1 = test, 2 = train_eval ----------------------------
    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch
        logits = self.net(x)
        self.eval_loss[dataloader_idx].update(self.loss_fn(logits, y), weight=len(y))
        self.eval_acc[dataloader_idx].update(logits, y)

    def on_validation_epoch_start(self) -> None:
        for metric in (*self.eval_loss, *self.eval_acc):
            metric.reset()  # an evaluation starts from nothing (one cut short may have left a part)
        self._eval_start = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        values = {"eval/seconds": time.perf_counter() - self._eval_start}
        for i, name in enumerate(self.eval_names):
            # skip sets this loop did not evaluate; under DDP every rank must still compute, since
            # compute() is a collective and a rank's shard may be empty
            if self.eval_acc[i].update_count == 0 and not torch.distributed.is_initialized():
                continue
            values[f"{name}/loss"] = self.eval_loss[i].compute()
            values[f"{name}/acc"] = self.eval_acc[i].compute()
            self.eval_loss[i].reset()
            self.eval_acc[i].reset()
        if "train_eval/acc" in values and "test/acc" in values:
            values["gen_gap/acc"] = values["train_eval/acc"] - values["test/acc"]
            values["gen_gap/loss"] = values["test/loss"] - values["train_eval/loss"]
        log_rank_identical(self, values, prog_bar=False)  # torchmetrics computes over all ranks

    # ---- optimizer -----------------------------------------------------------------------
    def _fractional_epoch(self, step: int, steps_per_epoch: int) -> float:
        """The epoch (0-based, fractional) after ``step`` optimizer steps.

        Inside the training loop: the epoch counter plus the share of this epoch's optimizer steps
        done (``⌈micro-batches done / accumulation⌉`` of ``⌈micro-batches / accumulation⌉``), so the
        schedule stays on epochs when the accumulation changes between epochs (the adaptive
        batch); under a constant accumulation this equals ``step / steps_per_epoch``, the rule
        used outside the loop (the scheduler's first call, at step 0)."""
        trainer = self._trainer
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if step == 0 or loop is None or not trainer.training:
            return step / steps_per_epoch
        acc = trainer.accumulate_grad_batches
        done = loop.batch_progress.current.ready
        return trainer.current_epoch + math.ceil(done / acc) / max(
            math.ceil(trainer.num_training_batches / acc), 1
        )

    def scale_lr(self, scale: float) -> None:
        """Set :attr:`batch_lr_scale` to ``scale`` and the optimizer's current lr with it (the
        scheduler recomputes it from the next step on); the adaptive batch calls this at epoch
        starts."""
        ratio = scale / self.batch_lr_scale
        self.batch_lr_scale = scale
        if ratio != 1:
            for opt in self.trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= ratio

    def configure_optimizers(self):
        s = self.sgd
        opt = torch.optim.SGD(
            self.net.parameters(),
            lr=s.effective_lr,
            momentum=s.momentum,
            nesterov=s.nesterov,
            weight_decay=s.weight_decay,
        )
        total_steps = self.trainer.estimated_stepping_batches
        total_epochs: list[float] = []  # fixed at the first step, under the accumulation of epoch 0

        def factor(step: int) -> float:
            # optimizer steps per epoch, known once the train dataloader is loaded (before step 1)
            batches = self.trainer.num_training_batches
            if not math.isfinite(batches):
                return s.lr_factor(0.0, 1.0) * self.batch_lr_scale
            steps_per_epoch = max(math.ceil(batches / self.trainer.accumulate_grad_batches), 1)
            if not total_epochs:
                total_epochs.append(total_steps / steps_per_epoch)
            return s.lr_factor(self._fractional_epoch(step, steps_per_epoch), total_epochs[0]) * (
                self.batch_lr_scale
            )

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
