"""``HessianSpectrum``: the top of the loss Hessian's spectrum at epoch ends (paper B's measurement).

A thin wrapper around :func:`callbacks.hessian.hessian_eigenvalues` / :func:`hessian_trace`:
every ``every_n_epochs`` epochs and once more when training ends, on a FIXED, un-augmented
subset of the training set (the same samples every epoch and every run), it logs

    hessian/lambda_1 ... hessian/lambda_k   top-k eigenvalues (largest algebraic), descending
    hessian/lambda_min                      smallest eigenvalue (negative: a saddle direction)
    hessian/trace, hessian/trace_stderr     Hutchinson trace (if ``trace=true``)
    hessian/residual                        largest relative residual ||Hv - λv|| / |λ_1|
    hessian/n_hvp, hessian/seconds          cost of this measurement

The Hessian is that of the data loss alone (cross-entropy, no weight decay: with
``weight_decay=wd`` the optimizer's objective adds ``wd`` to every eigenvalue). BatchNorm
policy: ``bn_mode="eval"`` (default, as paper B) uses the running statistics, which makes the
loss a fixed sum over samples, identical on any device count; ``"train"`` uses per-batch
statistics (of ``batch_size`` samples) and is recorded as such. Under DDP every rank takes
its contiguous block of the subset (no sample twice) and the products are all-reduced, so
every rank logs the same numbers as a single device would.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from callbacks.common import (
    gradients_enabled,
    preserved_module_state,
    split_batches,
)
from callbacks.epoch_measurement import EpochEndMeasurement, load_rank_subset
from callbacks.hessian import HessianOperator, hutchinson_trace, lanczos_eigenvalues

BN_MODES = ("eval", "train")


class HessianSpectrum(EpochEndMeasurement):
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
    ):
        super().__init__(every_n_epochs, at_end, "hessian")
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"hessian.k={k!r}: must be an integer >= 1")
        if subset_size is not None and not (isinstance(subset_size, int) and subset_size >= 1):
            raise ValueError(f"hessian.subset_size={subset_size!r}: must be a positive integer or null (all)")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"hessian.batch_size={batch_size!r}: must be a positive integer")
        if bn_mode not in BN_MODES:
            raise ValueError(f"hessian.bn_mode={bn_mode!r}: allowed {', '.join(BN_MODES)}")
        if not tol > 0:
            raise ValueError(f"hessian.tol={tol!r}: must be > 0")
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
        metrics = {f"hessian/lambda_{i + 1}": v for i, v in enumerate(eig.eigenvalues.tolist())}
        if self.smallest:
            metrics["hessian/lambda_min"] = float(eig.smallest[0])
        residuals = eig.residuals.tolist() + eig.smallest_residuals.tolist()
        metrics["hessian/residual"] = max(residuals) / max(abs(float(eig.eigenvalues[0])), 1e-30)
        metrics["hessian/converged"] = float(eig.converged)
        if tr is not None:
            metrics["hessian/trace"], metrics["hessian/trace_stderr"] = tr.trace, tr.stderr
        n_hvp = op.n_hvp
        metrics["hessian/n_hvp"] = float(n_hvp)
        metrics["hessian/seconds"] = time.perf_counter() - start
        return metrics

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._data is not None:
            return
        dataset = trainer.datamodule.measurement_dataset("train")
        x, y, _ = load_rank_subset(
            dataset, self.subset_size, self.subset_seed, trainer.global_rank, trainer.world_size
        )
        self._data = (x, y)
        rank_zero_info(
            f"[HessianSpectrum] top-{self.k} eigenvalues on {min(self.subset_size or len(dataset), len(dataset))} "
            f"fixed training samples (BatchNorm in {self.bn_mode} mode) every {self.every_n_epochs} epoch(s)"
        )

    def _measure_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        param = next(pl_module.parameters())
        x, y = (t.to(param.device) for t in self._data)
        loss_fn = getattr(pl_module, "loss_fn", None) or nn.functional.cross_entropy
        return self.measure(pl_module, loss_fn, x.to(param.dtype), y)
