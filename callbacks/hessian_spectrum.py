"""``HessianSpectrum``: the top of the loss Hessian's spectrum at epoch ends (paper B's measurement)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from callbacks.epoch_measurement import EpochEndMeasurement
from lightning_modules.config import BN_MODES, ConfigError, check
from measures.batches import load_rank_subset, split_batches
from measures.estimators import hutchinson_trace
from measures.hessian import HessianOperator
from measures.linalg import (
    STOPS,
    LanczosProgress,
    ProgressLines,
    lanczos_eigenvalues,
    warm_start_vector,
)
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
        hessian/rel_error                       largest estimated eigenvalue error, over |λ_1|
        hessian/residual                        largest relative residual ||Hv - λv|| / |λ_1|
        hessian/converged                       1.0 if the stop (``tol``) was reached
        hessian/warm                            1.0 if Lanczos started from the previous Ritz vectors
        hessian/n_hvp, hessian/seconds          cost of this measurement

    The Hessian is that of the data loss alone (``pl_module.loss_fn``, else cross-entropy; no
    weight decay: with ``weight_decay=wd`` the optimizer's objective adds ``wd`` to every
    eigenvalue). Under DDP every rank takes its contiguous block of the subset (no sample twice)
    and the products are all-reduced, so every rank logs the numbers a single device would.

    **Accuracy.** By default (``stop="eigenvalue"``, ``tol=1e-4``) Lanczos stops once every
    reported eigenvalue's estimated error (``hessian/rel_error``) is at most ``tol · |λ_1|`` at three
    consecutive steps: λ_1 to ~4 significant digits, λ_min to the same absolute accuracy. The
    estimate (about ``residual² / gap``, never more than the residual) assumes every eigenvalue
    next to a reported one has been resolved; see :func:`measures.linalg.ritz_error_bounds`.
    ``stop="residual"`` restores the former rule (residual ``<= tol · |λ_1|``; with ``tol=1e-5``
    eigenvalues to ~1e-10).

    **Warm start** (``warm_start=true``, off by default): each measurement starts Lanczos from the
    previous one's Ritz vectors (the ``k`` top and the lowest, with 2 guard vectors beside each
    end) combined into one vector, plus an equal share of the seeded random vector a cold start
    would use; it then takes at least as many steps as the block has directions (+2) and confirms
    its stop over 3 extra steps. Rank-independent (the vectors come from all-reduced products).
    It falls back to a random start for the next measurement when a warm one used at least as
    many products as the last cold one, and after a change of the model's size. The combined
    vector (one model-sized float64 vector: +494 KB on LeNet's 506 KB checkpoint) is kept in the
    checkpoint when it is at most ``warm_start_checkpoint_mb``, so a resumed run measures exactly
    as an uninterrupted one; larger models start cold after a resume. Why it is off: on the
    default 10-epoch run (``benchmarks/hessian_warm.py``) it saved 4% of the products (362 vs 378)
    and at one epoch reported λ_min's near-degenerate neighbour instead of λ_min (error 2.8e-4 of
    |λ_1|, above ``tol``): the top eigenvalues are outliers a cold start finds in ~12 products, and
    the eigenvectors at the dense negative end turn too much between epochs. See
    :func:`measures.linalg.lanczos_eigenvalues` for what the guards do and do not catch.

    Args:
        every_n_epochs, every_n_steps, at_end, prefix: when to measure (exactly one of
            ``every_n_epochs`` and ``every_n_steps``) and the metric namespace
            (:class:`~callbacks.epoch_measurement.EpochEndMeasurement`).
        subset_size: fixed training samples (null: the whole training split); ``subset_seed``
            chooses them.
        batch_size: samples per forward pass of the Hessian-vector products.
        k: top-k eigenvalues; ``smallest``: also λ_min.
        tol, stop, max_iter: the Lanczos stop (see above) and its step budget.
        warm_start, warm_start_checkpoint_mb: see above.
        float64: measure on a float64 copy of the network (``pl_module.net``): a reference, several
            times slower on CPU.
        trace, trace_rtol, trace_max_samples: Hutchinson trace and its stop.
        bn_mode: "eval" (default, paper B: running statistics, so the loss is a fixed sum over
            samples, identical on any device count) or "train" (per-batch statistics of
            ``batch_size`` samples).
        seed: the start vector's seed.
        progress_after_s: a measurement running longer than this prints its Lanczos step and
            current error every few seconds (rank 0 only); null: never.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        subset_size: int | None = 1000,
        subset_seed: int = 0,
        batch_size: int = 500,
        k: int = 3,
        smallest: bool = True,
        tol: float = 1e-4,
        stop: str = "eigenvalue",
        max_iter: int = 100,
        warm_start: bool = False,
        warm_start_checkpoint_mb: float = 64.0,
        float64: bool = False,
        trace: bool = False,
        trace_rtol: float = 0.05,
        trace_max_samples: int = 100,
        bn_mode: str = "eval",
        at_end: bool = True,
        seed: int = 0,
        prefix: str = "hessian",
        progress_after_s: float | None = 5.0,
        every_n_steps: int | None = None,
    ):
        super().__init__(every_n_epochs, at_end, prefix, every_n_steps)
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
        check(stop in STOPS, "stop", stop, f"allowed: {', '.join(STOPS)}")
        check(isinstance(max_iter, int) and max_iter >= 1, "max_iter", max_iter, "must be an integer >= 1")
        check(
            warm_start_checkpoint_mb >= 0,
            "warm_start_checkpoint_mb",
            warm_start_checkpoint_mb,
            "must be >= 0 (0: never keep the start vector in checkpoints)",
        )
        check(
            progress_after_s is None or progress_after_s >= 0,
            "progress_after_s",
            progress_after_s,
            "must be >= 0 or null (never)",
        )
        self.subset_size, self.subset_seed = subset_size, subset_seed
        self.batch_size, self.k, self.smallest = batch_size, k, smallest
        self.tol, self.stop, self.max_iter = tol, stop, max_iter
        self.warm_start, self.warm_start_checkpoint_mb = warm_start, warm_start_checkpoint_mb
        self.float64 = float64
        self.trace, self.trace_rtol, self.trace_max_samples = trace, trace_rtol, trace_max_samples
        self.bn_mode, self.seed = bn_mode, seed
        self.progress_after_s = progress_after_s
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None
        # warm start: the previous measurement's combined Ritz vector (float64, CPU), the product
        # count of the last cold measurement, and whether the next one must be cold
        self._start: torch.Tensor | None = None
        self._cold_hvp: int | None = None
        self._next_cold = False

    # ---- the measurement, usable without a Trainer (see measure.py) -------------------------
    def measure(
        self,
        model: nn.Module,
        loss_fn,
        x: torch.Tensor,
        y: torch.Tensor,
        progress: Callable[[LanczosProgress], None] | None = None,
    ) -> dict[str, float]:
        """Spectrum (and trace) of ``loss_fn(model(x), y)`` on this rank's ``(x, y)``, in ``bn_mode``.

        Warm-starts from the previous call's Ritz vectors when ``warm_start`` (see the class);
        ``progress`` receives each Lanczos step (:class:`~measures.linalg.LanczosProgress`).
        """
        start_time = time.perf_counter()
        if self.float64:
            model = copy.deepcopy(model).double()
            x = x.double()
        with gradients_enabled(), preserved_module_state(model, mode=self.bn_mode):
            # one operator for both: the forward pass and first backward are cached once
            op = HessianOperator(model, loss_fn, split_batches(x, y, self.batch_size))
            start = self._start if self.warm_start and not self._next_cold else None
            if start is not None and start.shape != (op.dim,):
                start = None  # another model: start cold
            try:
                eig = lanczos_eigenvalues(
                    op,
                    self.k,
                    smallest=int(self.smallest),
                    tol=self.tol,
                    stop=self.stop,
                    max_iter=self.max_iter,
                    seed=self.seed,
                    start=start,
                    return_start=self.warm_start,
                    progress=progress,
                )
                tr = None
                if self.trace:
                    tr = hutchinson_trace(
                        op, rtol=self.trace_rtol, max_samples=self.trace_max_samples, seed=self.seed
                    )
            finally:
                op.release()
        if self.warm_start:
            self._remember(eig.start_vectors, eig.n_hvp, eig.warm)
        p = self.prefix
        metrics = {f"{p}/lambda_{i + 1}": v for i, v in enumerate(eig.eigenvalues.tolist())}
        if self.smallest:
            metrics[f"{p}/lambda_min"] = float(eig.smallest[0])
        residuals = eig.residuals.tolist() + eig.smallest_residuals.tolist()
        metrics[f"{p}/rel_error"] = eig.rel_error
        metrics[f"{p}/residual"] = max(residuals) / max(abs(float(eig.eigenvalues[0])), 1e-30)
        metrics[f"{p}/converged"] = float(eig.converged)
        metrics[f"{p}/warm"] = float(eig.warm)
        if tr is not None:
            metrics[f"{p}/trace"], metrics[f"{p}/trace_stderr"] = tr.trace, tr.stderr
        metrics[f"{p}/n_hvp"] = float(op.n_hvp)
        metrics[f"{p}/seconds"] = time.perf_counter() - start_time
        return metrics

    def _remember(self, vectors: torch.Tensor | None, n_hvp: int, warm: bool) -> None:
        """Keep the next start vector and decide whether the next measurement starts cold.

        Only all-reduced quantities decide (the Ritz vectors, the product count): every rank
        takes the same decision."""
        combined = None if vectors is None else warm_start_vector(vectors.detach())
        self._start = None if combined is None else combined.to("cpu", torch.float64)
        if not warm:
            self._cold_hvp, self._next_cold = n_hvp, False
        else:  # a warm start that did not pay: the next measurement starts cold (and re-prices)
            self._next_cold = self._cold_hvp is not None and n_hvp >= self._cold_hvp

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._data is not None:
            return
        dataset = self.measurement_dataset(trainer, "train")
        x, y, _ = load_rank_subset(
            dataset, self.subset_size, self.subset_seed, trainer.global_rank, trainer.world_size
        )
        if self.float64 and not isinstance(getattr(pl_module, "net", None), nn.Module):
            raise ConfigError(
                "float64",
                True,
                f"needs the network as {type(pl_module).__name__}.net (to measure a float64 copy)",
            )
        self._data = (x, y)
        rank_zero_info(
            f"[HessianSpectrum] top-{self.k} eigenvalues on {min(self.subset_size or len(dataset), len(dataset))} "
            f"fixed training samples (BatchNorm in {self.bn_mode} mode) {self.schedule}, "
            f"to {self.tol:g} of |λ_1| ({self.stop} stop{', warm-started' if self.warm_start else ''})"
        )

    def measure_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        param = next(pl_module.parameters())
        x, y = (t.to(param.device) for t in self._data)
        loss_fn = getattr(pl_module, "loss_fn", None) or nn.functional.cross_entropy
        model = pl_module.net if self.float64 else pl_module  # a copy of the network is converted
        progress = None
        if self.progress_after_s is not None:
            name = type(self).__name__ + ("" if self.prefix == "hessian" else f":{self.prefix}")
            label = f"[{name}] epoch {trainer.current_epoch}"
            progress = ProgressLines(label, rank_zero_info, after_s=self.progress_after_s)
        return self.measure(model, loss_fn, x.to(param.dtype), y, progress=progress)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(cold_hvp=self._cold_hvp, next_cold=self._next_cold)
        if self._start is not None and self._start.numel() * 8 <= self.warm_start_checkpoint_mb * 2**20:
            state["start_vector"] = self._start.clone()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._cold_hvp = state_dict.get("cold_hvp")
        self._next_cold = bool(state_dict.get("next_cold", False))
        start = state_dict.get("start_vector")
        self._start = None if start is None else start.to("cpu", torch.float64)
