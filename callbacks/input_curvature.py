"""``InputCurvature``: per-example input-space curvature at clean and adversarial points, at epoch ends."""

from __future__ import annotations

import copy
import time

import pytorch_lightning as pl
import torch
from torch import nn

from callbacks.epoch_measurement import EpochEndMeasurement
from lightning_modules.config import check
from measures.batches import fixed_subset_indices, load_rank_subset, split_batches
from measures.distributed import all_reduce_sum
from measures.input_curvature import input_curvature
from measures.module_state import preserved_module_state
from measures.pgd import pgd_iterates


class InputCurvature(EpochEndMeasurement):
    """Eigenvalues of each example's input Hessian ∇²ₓ L(x, y), at clean and PGD points.

    A thin wrapper around :func:`measures.input_curvature.input_curvature`: on a FIXED, seeded test
    subset, with the unwrapped module in eval mode, it measures every example's top eigenvalue and
    λ_min (and, with ``trace``, its exact trace) at the clean points and at the L∞ PGD points of
    each ``eps`` (``pgd_steps`` steps of ``pgd_step_size``, null: 2.5·eps/steps, from the same
    per-sample random starts as :class:`~callbacks.adversarial_accuracy.AdversarialAccuracy` with
    the same ``seed``), and logs per point set ``<set>`` (``clean``, ``pgd_eps<e>``; with
    ``along_path``, also ``pgd_eps<e>_path``: every iterate of the attack, pooled)::

        input/<set>/top_mean, top_median    the per-example top eigenvalue
        input/<set>/min_lambda_min          the smallest per-example λ_min
        input/<set>/lambda_min_mean
        input/<set>/trace_mean              (with trace)
        input/<set>/frac_negative           examples with λ_min < −neg_tol · λ_max
        input/converged, input/n_samples, input/seconds

    ``neg_tol`` (default 1e-4): a ReLU network's λ_min is 0 up to rounding, and float32 products
    carry relative errors ~1e-6 of λ_max, so a threshold well above that and well below the
    negative curvature of smooth activations separates the two. Every example's values are placed
    at its position in the fixed subset and summed over ranks, so the numbers (the median
    included) are those of one process on any device count.

    ``float64`` (default true): the eigenvalues are computed on a float64 copy of the network, at
    the points the network itself (float32) gives: a confidently classified example's input
    Hessian is tiny (softmax saturation), and float32 rounding then produces spurious negative
    eigenvalues a fair fraction of its λ_max, which ``frac_negative`` would count.

    Args:
        every_n_epochs, every_n_steps, at_end, prefix: when to measure and the metric namespace
            (:class:`~callbacks.epoch_measurement.EpochEndMeasurement`); with both intervals null,
            only the final weights are measured.
        subset_size, subset_seed: the fixed test samples (null: the whole test set).
        batch_size: examples per batched product.
        k: top eigenvalues per example (the first is summarized); λ_min is always measured.
        trace: also the exact trace per example (one product per input value).
        tol, max_iter: the Lanczos stop (estimated error within ``tol · |λ_max|``) and step cap.
        neg_tol: ``frac_negative`` counts λ_min < −neg_tol · λ_max.
        eps, pgd_steps, pgd_step_size: the L∞ PGD points (step size null: 2.5·eps/steps).
        along_path: also every PGD iterate, pooled.
        float64: eigenvalues of a float64 copy of the network (above).
        seed: the PGD starts' seed (the adversarial callback's, for the same starts).
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        subset_size: int | None = 100,
        subset_seed: int = 0,
        batch_size: int = 100,
        k: int = 1,
        trace: bool = False,
        tol: float = 1e-4,
        max_iter: int = 100,
        neg_tol: float = 1e-4,
        eps: list[float] = (0.1,),
        pgd_steps: int = 10,
        pgd_step_size: float | None = None,
        along_path: bool = False,
        float64: bool = True,
        at_end: bool = True,
        seed: int = 0,
        prefix: str = "input",
        every_n_steps: int | None = None,
    ):
        if every_n_epochs is None and every_n_steps is None:
            every_n_epochs = 10**9  # only at the end (at_end): the measurement is for final models
        super().__init__(every_n_epochs, at_end, prefix, every_n_steps)
        self.check_subset_size(subset_size)
        check(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "must be >= 1")
        check(isinstance(k, int) and k >= 1, "k", k, "must be an integer >= 1")
        check(
            isinstance(max_iter, int) and max_iter > k + 1, "max_iter", max_iter, f"must be > k + 1 = {k + 1}"
        )
        check(tol > 0, "tol", tol, "must be > 0")
        check(neg_tol >= 0, "neg_tol", neg_tol, "must be >= 0")
        check(all(0 < e <= 1 for e in eps), "eps", list(eps), "each eps in (0, 1] (pixel units)")
        check(
            isinstance(pgd_steps, int) and pgd_steps >= 1, "pgd_steps", pgd_steps, "must be an integer >= 1"
        )
        check(
            pgd_step_size is None or pgd_step_size > 0, "pgd_step_size", pgd_step_size, "must be > 0 or null"
        )
        self.subset_size, self.subset_seed, self.batch_size = subset_size, subset_seed, batch_size
        self.k, self.trace, self.tol, self.max_iter, self.neg_tol = k, trace, tol, max_iter, neg_tol
        self.eps, self.pgd_steps, self.pgd_step_size = [float(e) for e in eps], pgd_steps, pgd_step_size
        self.along_path, self.seed, self.float64 = along_path, seed, float64
        self._data = None
        self._n_total = 0
        self.histograms: dict[str, torch.Tensor] = {}  # the last measurement's per-example top eigenvalues

    def check_against(self, model: nn.Module, datamodule) -> None:
        """Refuse, before training, a subset larger than the test set and more eigenvalues than
        an input has pixels."""
        self.check_subset(datamodule, "test", self.subset_size)
        shape = getattr(getattr(datamodule, "info", None), "input_shape", None)
        dim = None if shape is None else int(torch.tensor(shape).prod())
        check(
            dim is None or self.k + 1 <= dim,
            "k",
            self.k,
            f"k + 1 (with λ_min) at most the {dim} input values",
        )

    def set_names(self) -> list[str]:
        """The point sets measured, in a fixed order (every rank runs the same collectives)."""
        names = ["clean"]
        for eps in self.eps:
            names.append(f"pgd_eps{eps:.4g}")
            if self.along_path:
                names.append(f"pgd_eps{eps:.4g}_path")
        return names

    def point_sets(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        """``{name: [points, ...]}``: the clean points and each eps's PGD end points (and path)."""
        sets = {"clean": [x]}
        for eps in self.eps:
            alpha = self.pgd_step_size or 2.5 * eps / self.pgd_steps
            path = pgd_iterates(model, x, y, idx, eps, alpha, self.pgd_steps, self.seed)
            sets[f"pgd_eps{eps:.4g}"] = [path[-1]]
            if self.along_path:
                sets[f"pgd_eps{eps:.4g}_path"] = path
        return sets

    def measure(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        position: torch.Tensor,
        n: int,
        progress=None,
    ) -> dict[str, float]:
        """This rank's examples (``position``: their places in the fixed subset of ``n``), summed over
        ranks. ``progress(done, total, message)`` is called after each point set of each batch (e.g.
        measure.py's progress bar)."""
        start = time.perf_counter()
        per_set: dict[str, list[torch.Tensor]] = {}
        converged = True
        measured = copy.deepcopy(model).double().eval() if self.float64 else model
        batches = split_batches(x, y, self.batch_size, extra=torch.stack([idx, position], 1))
        total, done = len(batches) * len(self.set_names()), 0
        with preserved_module_state(model, mode="eval"):
            for xb, yb, ib in batches:
                for name, points in self.point_sets(model, xb, yb, ib[:, 0]).items():
                    for j, p in enumerate(points):
                        r = input_curvature(
                            measured, p.double() if self.float64 else p, yb, ib[:, 0], k=self.k, trace=self.trace, tol=self.tol,
                            max_iter=self.max_iter, seed=self.seed,
                        )  # fmt: skip
                        converged = converged and bool(r.converged.all())
                        # one row per example and point: (position, top, λ_min, trace)
                        row = torch.zeros((len(p), 4), dtype=torch.float64)
                        row[:, 0] = ib[:, 1].double() * (len(points)) + j
                        row[:, 1], row[:, 2] = r.top[:, 0], r.smallest
                        row[:, 3] = r.trace if r.trace is not None else 0.0
                        per_set.setdefault(name, []).append(row)
                    done += 1
                    if progress is not None:
                        progress(done, total, f"{name}: {len(xb)} examples")
        metrics: dict[str, float] = {}
        flag = all_reduce_sum(torch.tensor([0.0 if converged else 1.0], dtype=torch.float64))
        for name in self.set_names():
            width = self.pgd_steps + 1 if name.endswith("_path") else 1  # points per example
            full = torch.zeros((n * width, 3), dtype=torch.float64)
            if per_set.get(name):
                rows = torch.cat(per_set[name])
                full[rows[:, 0].long()] = rows[:, 1:]
            full = all_reduce_sum(full)
            top, low, tr = full[:, 0], full[:, 1], full[:, 2]
            self.histograms[name] = top
            p = f"{self.prefix}/{name}"
            metrics[f"{p}/top_mean"] = float(top.mean())
            metrics[f"{p}/top_median"] = float(top.median())
            metrics[f"{p}/min_lambda_min"] = float(low.min())
            metrics[f"{p}/lambda_min_mean"] = float(low.mean())
            metrics[f"{p}/frac_negative"] = float((low < -self.neg_tol * top.abs()).double().mean())
            if self.trace:
                metrics[f"{p}/trace_mean"] = float(tr.mean())
        metrics[f"{self.prefix}/converged"] = float(flag.item() == 0)
        metrics[f"{self.prefix}/n_samples"] = float(n)
        metrics[f"{self.prefix}/seconds"] = time.perf_counter() - start
        return metrics

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._data is not None:
            return
        dataset = self.measurement_dataset(trainer, "test")
        x, y, idx = load_rank_subset(
            dataset, self.subset_size, self.subset_seed, trainer.global_rank, trainer.world_size
        )
        subset = fixed_subset_indices(len(dataset), self.subset_size, self.subset_seed)
        self._n_total = len(subset)
        self._data = (x, y, idx, torch.searchsorted(subset, idx))

    def measure_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        param = next(pl_module.parameters())
        x, y, idx, position = self._data
        net = getattr(pl_module, "net", pl_module)  # the network alone: the float64 copy is of it
        metrics = self.measure(
            net, x.to(param.device, param.dtype), y.to(param.device), idx, position, self._n_total
        )
        for logger in trainer.loggers:  # a logger that draws histograms (W&B) gets the per-example values
            log_histogram = getattr(logger, "log_histogram", None)
            if callable(log_histogram):
                for name, values in self.histograms.items():
                    log_histogram(
                        f"{self.prefix}/{name}/top_hist", values, trainer.current_epoch, trainer.global_step
                    )
        return metrics
