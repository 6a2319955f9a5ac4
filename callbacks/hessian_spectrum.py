"""``HessianSpectrum``: the top of the loss Hessian's spectrum at epoch ends (paper B's measurement)."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from callbacks.epoch_measurement import EpochEndMeasurement
from lightning_modules.config import BN_MODES, check
from measures.batches import load_rank_subset, split_batches
from measures.hessian import HessianOperator
from measures.linalg import hutchinson_trace, lanczos_eigenvalues
from measures.module_state import gradients_enabled, preserved_module_state


class HessianSpectrum(EpochEndMeasurement):
    """Top-k Hessian eigenvalues (and λ_min, trace) of the training loss at epoch ends.

    A thin wrapper around :class:`measures.hessian.HessianOperator` and the solvers of
    :mod:`measures.linalg`. Every ``every_n_epochs`` epochs and once more when training ends, on
    a FIXED, un-augmented subset of the training set (the same samples every epoch and run), it
    logs (``prefix`` = ``hessian`` by default)::

        hessian/lambda_1 ... hessian/lambda_k   top-k eigenvalues (largest algebraic), descending
        hessian/lambda_min                      smallest eigenvalue (negative: a saddle direction)
        hessian/trace, hessian/trace_stderr     Hutchinson trace (if ``trace=true``)
        hessian/residual                        largest relative residual ||Hv - λv|| / |λ_1|
        hessian/converged                       1.0 if every wanted residual reached ``tol``
        hessian/n_hvp, hessian/seconds          cost of this measurement

    The Hessian is that of the data loss alone (``pl_module.loss_fn``, else cross-entropy; no
    weight decay: with ``weight_decay=wd`` the optimizer's objective adds ``wd`` to every
    eigenvalue). Under DDP every rank takes its contiguous block of the subset (no sample twice)
    and the products are all-reduced, so every rank logs the numbers a single device would.

    Args:
        every_n_epochs, at_end, prefix: when to measure and the metric namespace
            (:class:`~callbacks.epoch_measurement.EpochEndMeasurement`).
        subset_size: fixed training samples (null: the whole training split); ``subset_seed``
            chooses them.
        batch_size: samples per forward pass of the Hessian-vector products.
        k: top-k eigenvalues; ``smallest``: also λ_min.
        tol, max_iter: Lanczos stop (every wanted residual <= tol · |λ_1|) and step budget.
        trace, trace_rtol, trace_max_samples: Hutchinson trace and its stop.
        bn_mode: "eval" (default, paper B: running statistics, so the loss is a fixed sum over
            samples, identical on any device count) or "train" (per-batch statistics of
            ``batch_size`` samples).
        seed: the start vector's seed.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        subset_size: int | None = 1000,
        subset_seed: int = 0,
        batch_size: int = 500,
        k: int = 3,
        smallest: bool = True,
        tol: float = 1e-5,
        max_iter: int = 100,
        trace: bool = False,
        trace_rtol: float = 0.05,
        trace_max_samples: int = 100,
        bn_mode: str = "eval",
        at_end: bool = True,
        seed: int = 0,
        prefix: str = "hessian",
    ):
        super().__init__(every_n_epochs, at_end, prefix)
        check(isinstance(k, int) and k >= 1, "k", k, "must be an integer >= 1")
        check(
            subset_size is None or (isinstance(subset_size, int) and subset_size >= 1),
            "subset_size",
            subset_size,
            "must be a positive integer or null (all)",
        )
        check(
            isinstance(batch_size, int) and batch_size >= 1,
            "batch_size",
            batch_size,
            "must be a positive integer",
        )
        check(bn_mode in BN_MODES, "bn_mode", bn_mode, f"allowed: {', '.join(BN_MODES)}")
        check(tol > 0, "tol", tol, "must be > 0")
        check(isinstance(max_iter, int) and max_iter >= 1, "max_iter", max_iter, "must be an integer >= 1")
        self.subset_size, self.subset_seed = subset_size, subset_seed
        self.batch_size, self.k, self.smallest = batch_size, k, smallest
        self.tol, self.max_iter = tol, max_iter
        self.trace, self.trace_rtol, self.trace_max_samples = trace, trace_rtol, trace_max_samples
        self.bn_mode, self.seed = bn_mode, seed
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- the measurement, usable without a Trainer (see measure.py) -------------------------
    def measure(self, model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Spectrum (and trace) of ``loss_fn(model(x), y)`` on this rank's ``(x, y)``, in ``bn_mode``."""
        start = time.perf_counter()
        with gradients_enabled(), preserved_module_state(model, mode=self.bn_mode):
            # one operator for both: the forward pass and first backward are cached once
            op = HessianOperator(model, loss_fn, split_batches(x, y, self.batch_size))
            try:
                eig = lanczos_eigenvalues(
                    op,
                    self.k,
                    smallest=int(self.smallest),
                    tol=self.tol,
                    max_iter=self.max_iter,
                    seed=self.seed,
                )
                tr = None
                if self.trace:
                    tr = hutchinson_trace(
                        op, rtol=self.trace_rtol, max_samples=self.trace_max_samples, seed=self.seed
                    )
            finally:
                op.release()
        p = self.prefix
        metrics = {f"{p}/lambda_{i + 1}": v for i, v in enumerate(eig.eigenvalues.tolist())}
        if self.smallest:
            metrics[f"{p}/lambda_min"] = float(eig.smallest[0])
        residuals = eig.residuals.tolist() + eig.smallest_residuals.tolist()
        metrics[f"{p}/residual"] = max(residuals) / max(abs(float(eig.eigenvalues[0])), 1e-30)
        metrics[f"{p}/converged"] = float(eig.converged)
        if tr is not None:
            metrics[f"{p}/trace"], metrics[f"{p}/trace_stderr"] = tr.trace, tr.stderr
        metrics[f"{p}/n_hvp"] = float(op.n_hvp)
        metrics[f"{p}/seconds"] = time.perf_counter() - start
        return metrics

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._data is not None:
            return
        dataset = self.measurement_dataset(trainer, "train")
        x, y, _ = load_rank_subset(
            dataset, self.subset_size, self.subset_seed, trainer.global_rank, trainer.world_size
        )
        self._data = (x, y)
        rank_zero_info(
            f"[HessianSpectrum] top-{self.k} eigenvalues on {min(self.subset_size or len(dataset), len(dataset))} "
            f"fixed training samples (BatchNorm in {self.bn_mode} mode) every {self.every_n_epochs} epoch(s)"
        )

    def measure_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        param = next(pl_module.parameters())
        x, y = (t.to(param.device) for t in self._data)
        loss_fn = getattr(pl_module, "loss_fn", None) or nn.functional.cross_entropy
        return self.measure(pl_module, loss_fn, x.to(param.dtype), y)
