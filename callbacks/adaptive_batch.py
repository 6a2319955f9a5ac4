"""``AdaptiveBatch``: ABS / ABSA, the batch size grown from the loss Hessian's top eigenvalue."""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from lightning_modules.config import AdversarialTraining, ConfigError, check
from lightning_modules.module import log_rank_identical
from measures.batch_schedule import (
    LR_SCALINGS,
    POLICIES,
    BatchState,
    adversarial_ratio,
    needs_measurement,
    next_noise_state,
    next_state,
    noise_estimates,
    noise_scale,
)
from measures.batches import load_rank_subset, split_batches
from measures.hessian import hessian_eigenvalues
from measures.module_state import gradients_enabled, preserved_module_state

METHODS = ("lanczos", "power")


class AdaptiveBatch(pl.Callback):
    """Adaptive batch size (ABS), and with ``adversarial=true`` adversarial training too (ABSA).

    Yao, Gholami, Keutzer, Mahoney, "Large batch size training of neural networks with adversarial
    training and second-order information" (authors' code: HessianFlow ``optimizer/absa.py``).
    Add it with ``'callbacks=[default,adaptive_batch]'`` (``conf/callbacks/adaptive_batch.yaml``).

    **The rule** (:func:`measures.batch_schedule.next_state`). Training starts at the base batch
    ``B0 = optimizer.batch_size``. At the end of every epoch while the batch is below
    ``max_batch_size``, the top Hessian eigenvalue λ of the training loss is measured on one fixed
    set of ``B0`` un-augmented training images (chosen by ``subset_seed``; eval mode; the
    framework's Lanczos, at most ``eig_max_iter`` products, to ``eig_tol`` of λ; ``eig_method:
    power`` for the authors' power iteration). The first measurement is the reference λ_ref. If
    λ <= λ_ref / ``trigger``, the batch doubles and λ_ref becomes λ; if ``duration`` epochs passed
    without a doubling it doubles anyway (λ_ref kept). At a doubling the lr is multiplied by the
    batch ratio (``lr_scaling: linear``; ``sqrt``; ``none``), on top of the optimizer's own
    schedule. Once the batch is ``max_batch_size``, nothing more is measured. The new batch holds
    from the next epoch on.

    **ABSA** (``adversarial: true``): the first ``⌊adv_ratio · len(micro-batch)⌋`` samples of every
    micro-batch are replaced by their FGSM examples at ``adv_eps`` (L∞, [0, 1] pixels; made in eval
    mode; labels kept). ``adv_ratio`` halves at every doubling and is 0 for good once it is
    ``<= 1 / B0`` or from epoch ``max_epochs / 2`` on. Do not combine with
    ``adversarial_training.enabled``.

    **How the batch grows.** By gradient accumulation over the run's micro-batches (of ``B0``, or
    of ``max_micro_batch``): ``trainer.accumulate_grad_batches`` is set at every epoch start (as
    Lightning's ``GradientAccumulationScheduler`` does) to the run's accumulation × ``B / B0``, so
    memory and what BatchNorm sees stay those of ``B0``, on any device count: one optimizer step
    covers ``B / B0`` consecutive global batches of ``B0`` (global batch = micro × accumulation ×
    devices). An epoch whose batches do not fill the last step ends with a smaller step (Lightning
    still divides its loss by the full accumulation). The optimizer's schedule follows epochs, not
    steps (see ``SGDClassifier._fractional_epoch``).

    **The noise-scale policy** (``policy: noise_scale``; McCandlish et al. 2018, "An empirical model
    of large-batch training", appendix A): no Hessian; at every optimizer step the squared norms of
    two gradients give unbiased estimates of ``|G|²`` and ``tr(Σ)``
    (:func:`measures.batch_schedule.noise_estimates`): of one micro-batch (this device's first of the
    step, ``B_small``) and of the step's accumulated batch (``B_big``, all devices). While a step is
    one micro-batch per device (at ``B0`` without accumulation) the pair is this step's gradient
    (``B_small`` = the global batch) and its mean with the previous step's (``2 B_small``; one step
    stale). Steps whose micro-batches differ in size (an epoch's last) are skipped. At the epoch's
    end the estimates' sums are all-reduced (every rank takes the same decision) and ``B_noise =
    Σ tr(Σ) / Σ |G|²``; the batch grows to the smallest ``B0 × 2^k >= B_noise`` (at most
    ``max_batch_size``, never shrinking), the lr scaled as above. Logged: ``abs/noise_scale``.
    Assumes unscaled gradients at ``on_after_backward`` (not with 16-bit AMP's loss scaling).

    **Logged** at every epoch end (CSV, ``results.json`` history, W&B; the last values are the
    record's ``final``): ``abs/batch_size`` (global batch of the epoch), ``abs/lr`` (the effective
    lr at its start), ``abs/adv_ratio`` (its adversarial share), ``abs/lambda`` (when measured),
    ``abs/lambda_ref``, ``abs/optimizer_steps`` and ``abs/samples`` (so far), ``abs/doublings``, and ``abs/seconds`` (the time its own measurement took: the record's time split shows it beside training).

    **Distributed.** Every rank takes its contiguous block of the same ``B0`` images and the
    Hessian-vector products are all-reduced (:class:`measures.hessian.HessianOperator`), so every
    rank takes the same decision. ABSA's count is per device micro-batch: the same adversarial
    samples as on one device when ``adv_ratio · micro`` is a whole number on both.

    **Resuming.** The whole state (batch, λ_ref, epochs since the last doubling, lr multiplier,
    adversarial ratio, samples) is in the checkpoint; the module saves the lr multiplier it applied.

    Args:
        adversarial: ABSA (true) or ABS (false).
        max_batch_size: the cap (a power-of-two multiple of ``B0``, at most the training set);
            null: 128 × ``B0`` (the paper), lowered to the largest such multiple that fits the
            training set.
        duration: epochs without a doubling after which the batch doubles anyway.
        trigger: the batch doubles when λ <= λ_ref / trigger (> 1).
        lr_scaling: linear | sqrt | none.
        adv_ratio, adv_eps: ABSA's starting share of adversarial samples and FGSM's radius.
        eig_method, eig_max_iter, eig_tol, eig_seed: the eigenvalue's solver, its product budget,
            its tolerance (relative to λ) and its start vector's seed.
        subset_seed: which ``B0`` training images the eigenvalue is measured on.
        policy: hessian (ABS/ABSA, the eigenvalue rule) | noise_scale (the gradient noise scale).
    """

    def __init__(
        self,
        adversarial: bool = False,
        max_batch_size: int | None = None,
        duration: int = 10,
        trigger: float = 2.0,
        lr_scaling: str = "linear",
        adv_ratio: float = 0.2,
        adv_eps: float = 0.005,
        eig_method: str = "lanczos",
        eig_max_iter: int = 10,
        eig_tol: float = 1e-2,
        eig_seed: int = 0,
        subset_seed: int = 0,
        policy: str = "hessian",
    ):
        check(policy in POLICIES, "policy", policy, f"allowed: {', '.join(POLICIES)}")
        check(isinstance(adversarial, bool), "adversarial", adversarial, "must be true or false")
        check(
            max_batch_size is None or (isinstance(max_batch_size, int) and max_batch_size >= 1),
            "max_batch_size",
            max_batch_size,
            "must be a positive integer or null (128 x optimizer.batch_size)",
        )
        check(
            isinstance(duration, int) and not isinstance(duration, bool) and duration >= 1,
            "duration",
            duration,
            "must be an integer >= 1 (epochs)",
        )
        check(_number(trigger) and trigger > 1, "trigger", trigger, "must be a number > 1")
        check(lr_scaling in LR_SCALINGS, "lr_scaling", lr_scaling, f"allowed: {', '.join(LR_SCALINGS)}")
        check(_number(adv_ratio) and 0 <= adv_ratio <= 1, "adv_ratio", adv_ratio, "must be in [0, 1]")
        check(_number(adv_eps) and adv_eps >= 0, "adv_eps", adv_eps, "must be a number >= 0")
        check(eig_method in METHODS, "eig_method", eig_method, f"allowed: {', '.join(METHODS)}")
        check(
            isinstance(eig_max_iter, int) and eig_max_iter >= 2,
            "eig_max_iter",
            eig_max_iter,
            "must be an integer >= 2",
        )
        check(_number(eig_tol) and eig_tol > 0, "eig_tol", eig_tol, "must be a number > 0")
        self.adversarial, self.max_batch_size, self.duration = adversarial, max_batch_size, duration
        self.trigger, self.lr_scaling = trigger, lr_scaling
        self.adv_ratio, self.adv_eps = adv_ratio, adv_eps
        self.eig_method, self.eig_max_iter, self.eig_tol, self.eig_seed = (
            eig_method,
            eig_max_iter,
            eig_tol,
            eig_seed,
        )
        self.subset_seed, self.policy = subset_seed, policy
        self._noise_reset()
        self.base_batch: int | None = None
        self.max_batch: int | None = None
        self._base_accumulate = 1
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None
        self.state: BatchState | None = None
        self.samples = 0

    # ---- checks before training ----------------------------------------------------------
    def resolve(self, base_batch: int, train_size: int | None) -> int:
        """``max_batch_size`` for a base batch and training set, checked (raises ConfigError)."""
        b0 = base_batch
        if self.max_batch_size is None:
            cap = 128 * b0
            while train_size is not None and cap > b0 and cap > train_size:
                cap //= 2
            return cap
        bmax = self.max_batch_size
        check(bmax >= b0, "max_batch_size", bmax, f"must be >= the base batch optimizer.batch_size={b0}")
        ratio = bmax // b0
        check(
            bmax % b0 == 0 and ratio & (ratio - 1) == 0,
            "max_batch_size",
            bmax,
            f"must be optimizer.batch_size={b0} times a power of two (the batch doubles): "
            f"e.g. {b0 * 2 ** max(int(math.log2(max(bmax / b0, 1))), 0)}",
        )
        check(
            train_size is None or bmax <= train_size,
            "max_batch_size",
            bmax,
            f"larger than the {train_size} training images: an epoch would be less than one step",
        )
        return bmax

    def check_against(self, model: nn.Module, datamodule) -> None:
        """Refuse, before training, a cap the schedule cannot reach or use (see :meth:`resolve`)."""
        size = getattr(datamodule, "split_size", None)
        self.resolve(datamodule.batch_size, None if size is None else size("train"))

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        n_train = dm.split_size("train")
        self.base_batch = dm.batch_size
        self.max_batch = self.resolve(self.base_batch, n_train)
        world = trainer.world_size
        check(
            self.max_batch % world == 0,
            "max_batch_size",
            self.max_batch,
            f"must split evenly across {world} devices",
        )
        if not pl_module.automatic_optimization:
            raise ConfigError("adaptive_batch", "manual optimization", "needs automatic optimization")
        if self.adversarial and getattr(getattr(pl_module, "adv", None), "enabled", False):
            raise ConfigError(
                "adversarial",
                True,
                "ABSA makes its own FGSM examples: set adversarial_training.enabled=false",
            )
        self._base_accumulate = int(trainer.accumulate_grad_batches)
        full, rest = divmod(n_train, self.base_batch)
        kept = rest if rest and not dm.drop_last and rest >= world else 0
        self._epoch_samples = full * self.base_batch + kept
        if self.state is None:
            self.state = BatchState(self.base_batch, adv_ratio=self.adv_ratio if self.adversarial else 0.0)
        if self._data is None:
            x, y, _ = load_rank_subset(
                dm.measurement_dataset("train"), self.base_batch, self.subset_seed, trainer.global_rank, world
            )
            self._data = (x, y)
        rank_zero_info(
            f"[AdaptiveBatch] {'ABSA' if self.adversarial else 'ABS'}: batch {self.base_batch} -> at most "
            f"{self.max_batch}, "
            + (
                "grown to the gradient noise scale at epoch ends"
                if self.policy == "noise_scale"
                else f"doubling when lambda_1 <= lambda_ref / {self.trigger:g} or after {self.duration} epochs"
            )
            + f"; lr scaling {self.lr_scaling}"
        )

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the state in force for the epoch about to run (idempotent: at every epoch start and
        once more at the train start, since Lightning skips the epoch start of a resumed epoch)."""
        s = self.state
        trainer.accumulate_grad_batches = self._base_accumulate * (s.batch_size // self.base_batch)
        pl_module.scale_lr(s.lr_scale)
        ratio = self._epoch_adv_ratio(trainer)
        pl_module.adv_schedule = (
            AdversarialTraining(enabled=True, attack="fgsm", eps=self.adv_eps, fraction=ratio)
            if ratio > 0
            else None
        )

    def _epoch_adv_ratio(self, trainer: pl.Trainer) -> float:
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        return adversarial_ratio(self.state.adv_ratio, trainer.current_epoch, max_epochs, self.base_batch)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)
        self._noise_reset()

    # ---- the gradient noise scale ------------------------------------------------------------
    def _noise_reset(self) -> None:
        self._sums = [0.0, 0.0, 0.0]  # Σ|G|², Σtr(Σ), steps, this epoch on this rank
        self._micro_sizes: list[int] = []
        self._small_sq: float | None = None
        self._prev: torch.Tensor | None = None

    def _noise_active(self) -> bool:
        return (
            self.policy == "noise_scale"
            and self.state is not None
            and needs_measurement(self.state, self.max_batch)
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._noise_active():
            self._micro_sizes.append(len(batch[0]))

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        acc = int(trainer.accumulate_grad_batches)
        if self._noise_active() and acc > 1 and len(self._micro_sizes) == 1:
            self._small_sq = (
                float(_grad_vector(pl_module).square().sum()) * acc**2
            )  # Lightning divides by acc

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self._noise_active():
            return
        sizes, small_sq, acc = self._micro_sizes, self._small_sq, int(trainer.accumulate_grad_batches)
        self._micro_sizes, self._small_sq = [], None
        full = len(sizes) == acc and len(set(sizes)) == 1
        grad = _grad_vector(pl_module)
        if not full:
            self._prev = None
            return
        world = trainer.world_size
        if acc > 1:
            pair = (small_sq, float(grad.square().sum()), sizes[0], sizes[0] * acc * world)
        else:
            prev, self._prev = self._prev, grad.detach().clone()
            if prev is None or prev.shape != grad.shape:
                return
            pair = (
                float(grad.square().sum()),
                float(((grad + prev) / 2).square().sum()),
                sizes[0] * world,
                2 * sizes[0] * world,
            )
        g2, trace = noise_estimates(*pair)
        self._sums = [self._sums[0] + g2, self._sums[1] + trace, self._sums[2] + 1]

    def epoch_noise_scale(self, pl_module: pl.LightningModule) -> float:
        """``B_noise`` of this epoch, over every rank's steps (the sums all-reduced)."""
        sums = torch.tensor(self._sums, dtype=torch.float64, device=next(pl_module.parameters()).device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        return noise_scale(float(sums[0]), float(sums[1])) if sums[2] > 0 else math.nan

    def measure(self, pl_module: pl.LightningModule) -> float:
        """The top Hessian eigenvalue on the fixed ``B0`` images (all ranks' shares), in eval mode."""
        param = next(pl_module.parameters())
        x, y = (t.to(param.device) for t in self._data)
        loss_fn = getattr(pl_module, "loss_fn", None) or nn.functional.cross_entropy
        with gradients_enabled(), preserved_module_state(pl_module, mode="eval"):
            eig = hessian_eigenvalues(
                pl_module,
                loss_fn,
                split_batches(x.to(param.dtype), y, max(len(x), 1)),
                k=1,
                method=self.eig_method,
                tol=self.eig_tol,
                max_iter=self.eig_max_iter,
                seed=self.eig_seed,
            )
        return float(eig.eigenvalues[0])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        s = self.state
        metrics = {
            "abs/batch_size": float(s.batch_size),
            "abs/lr": self._epoch_lr(trainer, pl_module),
            "abs/adv_ratio": self._epoch_adv_ratio(trainer),
        }
        lam = None
        start = time.perf_counter()  # the schedule's own cost: its measurement and decision
        if self.policy == "noise_scale":
            b_noise = self.epoch_noise_scale(pl_module)
            metrics["abs/noise_scale"] = b_noise
            new, why = next_noise_state(
                s, b_noise, base_batch=self.base_batch, max_batch=self.max_batch, lr_scaling=self.lr_scaling
            )
        else:
            lam = self.measure(pl_module) if needs_measurement(s, self.max_batch) else None
            new, why = next_state(
                s,
                lam,
                max_batch=self.max_batch,
                duration=self.duration,
                trigger=self.trigger,
                lr_scaling=self.lr_scaling,
            )
        # "<part>/seconds": the record's time split counts it apart from training
        metrics["abs/seconds"] = time.perf_counter() - start
        self.samples += self._epoch_samples
        if lam is not None:
            metrics["abs/lambda"] = lam
        if new.lambda_ref is not None:
            metrics["abs/lambda_ref"] = float(new.lambda_ref)
        metrics["abs/optimizer_steps"] = float(trainer.global_step)
        metrics["abs/samples"] = float(self.samples)
        metrics["abs/doublings"] = float(new.doublings)
        log_rank_identical(pl_module, metrics)
        if new.batch_size != s.batch_size:
            rank_zero_info(
                f"[AdaptiveBatch] epoch {trainer.current_epoch}: "
                + (
                    f"B_noise {metrics['abs/noise_scale']:.4g}"
                    if lam is None
                    else f"lambda_1 {lam:.4g} (ref "
                    f"{s.lambda_ref if s.lambda_ref is None else f'{s.lambda_ref:.4g}'})"
                )
                + f", {why}: batch "
                f"{s.batch_size} -> {new.batch_size}, lr x {new.lr_scale / s.lr_scale:.4g}"
            )
        self.state = new

    def _epoch_lr(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """The effective lr at the start of this epoch: base × schedule × batch multiplier."""
        sgd = getattr(pl_module, "sgd", None)
        if sgd is None:
            return float(trainer.optimizers[0].param_groups[0]["lr"])
        total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else 1.0
        return sgd.effective_lr * sgd.lr_factor(float(trainer.current_epoch), total) * self.state.lr_scale

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        s = self.state
        return {} if s is None else {**s.__dict__, "samples": self.samples}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        state = dict(state_dict)
        self.samples = int(state.pop("samples", 0))
        self.state = BatchState(**state)


def _grad_vector(module: nn.Module) -> torch.Tensor:
    """Every parameter's gradient, flattened into one float64 vector (zeros where none)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
            for p in module.parameters()
        ]
    )


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
