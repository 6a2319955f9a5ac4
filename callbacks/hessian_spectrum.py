"""``HessianSpectrum``: the top of the loss Hessian's spectrum at epoch ends (paper B's measurement)."""

from __future__ import annotations

import copy
import functools
import inspect
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from callbacks import hessian_products as products
from callbacks.epoch_measurement import EpochEndMeasurement
from callbacks.training_target import annotate_run
from lightning_modules.config import BN_MODES, ConfigError, check
from measures.batches import load_items, load_rank_subset, split_batches
from measures.blocks import block_spectra, parameter_blocks
from measures.curvature import OPERATORS, curvature_operator
from measures.estimators import hutchinson_trace, hutchpp_trace
from measures.linalg import (
    STOPS,
    LanczosProgress,
    ProgressLines,
    lanczos_eigenvalues,
    warm_start_vector,
)
from measures.module_state import gradients_enabled, preserved_module_state

TRACE_MIN_SAMPLES = 10
"""Hutchinson samples drawn before the trace's stop rule is first checked."""
TRACE_METHODS = ("hutchinson", "hutchpp")
HUTCHPP_SKETCH = 10
"""Hutch++'s sketch (``trace_method=hutchpp``): 2 x 10 products before its Hutchinson samples."""


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
        hessian/converged                       1.0 if every stop was reached (Lanczos, and trace)
        hessian/trace_converged                 1.0 if the trace reached ``trace_rtol`` (with ``trace``)
        hessian/warm                            1.0 if Lanczos started from the previous Ritz vectors
        hessian/n_hvp, hessian/seconds          cost of this measurement
        hessian/layer/<block>/lambda_1          per block (``blocks``): top eigenvalue of its diagonal
        hessian/layer/<block>/trace             block, and (with ``trace``) its trace; hessian/layer_n_hvp

    **Operator** (``operator``): the loss Hessian (default), or the generalized Gauss-Newton
    (``ggn``), the empirical Fisher (``ef``), the Monte-Carlo Fisher with labels drawn from the
    model (``fisher``, one draw per sample, seeded by the sample's index), or Hessian - GGN
    (``functional``): :mod:`measures.curvature`. A second instance with another ``prefix`` measures
    another operator beside the Hessian (``conf/callbacks/ggn.yaml``: ``'callbacks=[default,ggn]'``).
    **Blocks** (``blocks``): ``module`` (one block per layer) or patterns on parameter names
    (a list, or ``{name: regex}``); each block's diagonal block (the other parameters fixed) gets
    its top eigenvalue and trace in the same measurement (:func:`measures.blocks.block_spectra`).

    The Hessian is that of the data loss alone (``pl_module.loss_fn``, else cross-entropy; no
    weight decay: with ``weight_decay=wd`` the optimizer's objective adds ``wd`` to every
    eigenvalue). Under DDP every rank takes its contiguous block of the subset (no sample twice)
    and the products are all-reduced, so every rank logs the numbers a single device would.

    **Accuracy.** By default (``stop="eigenvalue"``, ``tol=1e-4``) Lanczos stops once every
    reported eigenvalue's estimated error (``hessian/rel_error``) is at most ``tol · |λ_1|`` at three
    consecutive steps: λ_1 to about ``-log10(tol)`` significant digits, λ_min to the same absolute
    accuracy. The
    estimate (about ``residual² / gap``, never more than the residual) assumes every eigenvalue
    next to a reported one has been resolved; see :func:`measures.linalg.ritz_error_bounds`.
    ``stop="residual"`` restores the former rule (residual ``<= tol · |λ_1|``; the eigenvalue error
    is then about the residual squared over the gap, far below ``tol``).

    **Warm start** (``warm_start=true``, off by default): each measurement starts Lanczos from the
    previous one's Ritz vectors (the ``k`` top and the lowest, with 2 guard vectors beside each
    end) combined into one vector, plus an equal share of the seeded random vector a cold start
    would use; it then takes at least as many steps as the block has directions (+2) and confirms
    its stop over 3 extra steps. Rank-independent (the vectors come from all-reduced products).
    It falls back to a random start for the next measurement when a warm one used at least as
    many products as the last cold one, and after a change of the model's size. The combined
    vector (one model-sized float64 vector) is kept in the checkpoint when it is at most
    ``warm_start_checkpoint_mb``, so a resumed run measures exactly as an uninterrupted one;
    larger models start cold after a resume. Why it is off: the top eigenvalues are outliers that
    a cold start finds in few products, and the eigenvectors at the dense negative end turn too
    much between epochs for the old ones to help, so it saved little and can report λ_min's
    near-degenerate neighbour instead of λ_min (docs/measurements.md and
    ``benchmarks/hessian_warm.py`` have the measurements). See
    :func:`measures.linalg.lanczos_eigenvalues` for what the guards do and do not catch.

    **Convergence.** A measurement that did not reach its stop (Lanczos's ``tol`` within
    ``max_iter`` products, or the trace's ``trace_rtol`` within ``trace_max_samples``) is logged
    with ``hessian/converged`` 0 and warned about at once (:func:`rank_zero_warn`, naming the
    epoch, the error reached, the tolerance, and what to change); the run's record lists it under
    ``unconverged`` and the console summary marks it. Settings that cannot work for the model and
    data (``k`` beyond the parameter count or beyond what ``max_iter`` steps can deliver, a subset
    larger than the training set) are refused before training (:meth:`check_against`).

    Args:
        every_n_epochs, every_n_steps, at_end, prefix: when to measure (exactly one of
            ``every_n_epochs`` and ``every_n_steps``) and the metric namespace
            (:class:`~callbacks.epoch_measurement.EpochEndMeasurement`).
        subset_size: fixed training samples (null: the whole training split); ``subset_seed``
            chooses them.
        batch_size: samples per forward pass of the products: a number, or ``auto`` (250 on a CPU
            and with ``bn_mode=train``; on a GPU as many as a quarter of its free memory holds):
            see :mod:`callbacks.hessian_products`.
        k: top-k eigenvalues; ``smallest``: also λ_min.
        tol, stop, max_iter: the Lanczos stop (see above) and its step budget.
        warm_start, warm_start_checkpoint_mb: see above.
        float64: measure on a float64 copy of the network (``pl_module.net``): a reference, several
            times slower on CPU.
        trace, trace_rtol, trace_max_samples: Hutchinson trace and its stop.
        trace_method: ``hutchinson`` or ``hutchpp`` (Hutch++: a 10-vector sketch, then Hutchinson
            on the rest; the same stop).
        operator, blocks: see above (null blocks: none).
        bn_mode: "eval" (default, paper B: running statistics, so the loss is a fixed sum over
            samples, identical on any device count) or "train" (per-batch statistics of
            ``batch_size`` samples).
        seed: the start vector's seed.
        progress_after_s: a measurement running longer than this prints its Lanczos step and
            current error every few seconds (rank 0 only); null: never.
        hvp: the Hessian-vector products (operators hessian, functional): ``double_backward``,
            ``forward_over_reverse`` or ``auto`` (the faster of one timed product of each, logged as
            ``hessian/hvp_ms_<mode>``; ``hessian/hvp_forward_over_reverse`` says which was used; the
            record's ``<prefix>_products`` keeps the choice): :mod:`callbacks.hessian_products`.
    """

    def __init__(
        self,
        every_n_epochs: int | None = 2,
        subset_size: int | None = 1000,
        subset_seed: int = 0,
        batch_size: int | str = "auto",
        k: int = 3,
        smallest: bool = False,
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
        operator: str = "hessian",
        blocks: str | list | dict | None = None,
        trace_method: str = "hutchinson",
        hvp: str = "auto",
    ):
        super().__init__(every_n_epochs, at_end, prefix, every_n_steps)
        check(isinstance(k, int) and k >= 1, "k", k, "must be an integer >= 1")
        self.check_subset_size(subset_size)
        check(bn_mode in BN_MODES, "bn_mode", bn_mode, f"allowed: {', '.join(BN_MODES)}")
        check(tol > 0, "tol", tol, "must be > 0")
        check(stop in STOPS, "stop", stop, f"allowed: {', '.join(STOPS)}")
        check(isinstance(max_iter, int) and max_iter >= 1, "max_iter", max_iter, "must be an integer >= 1")
        check(
            max_iter > k + int(smallest),
            "k",
            k,
            f"k + smallest ({k + int(smallest)}) must be below max_iter ({max_iter}): Lanczos confirms "
            "n eigenvalues only with more than n steps (lower k, or raise max_iter)",
        )
        check(trace_rtol > 0, "trace_rtol", trace_rtol, "must be > 0")
        check(
            isinstance(trace_max_samples, int) and trace_max_samples >= TRACE_MIN_SAMPLES,
            "trace_max_samples",
            trace_max_samples,
            f"must be an integer >= {TRACE_MIN_SAMPLES} (the trace's first stop check)",
        )
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
        check(operator in OPERATORS, "operator", operator, f"allowed: {', '.join(OPERATORS)}")
        check(
            trace_method in TRACE_METHODS,
            "trace_method",
            trace_method,
            f"allowed: {', '.join(TRACE_METHODS)}",
        )
        if hasattr(blocks, "keys") or (hasattr(blocks, "__iter__") and not isinstance(blocks, str)):
            blocks = (
                dict(blocks) if hasattr(blocks, "keys") else list(blocks)
            )  # Hydra's DictConfig / ListConfig
        check(
            blocks is None or blocks == "module" or (isinstance(blocks, list | dict) and len(blocks) > 0),
            "blocks",
            blocks,
            "must be null, 'module', a list of patterns or a dict name -> pattern",
        )
        self.operator, self.blocks, self.trace_method = operator, blocks, trace_method
        products.check_product_settings(batch_size, hvp, operator)
        self.hvp, self._label = hvp, type(self).__name__ + ("" if prefix == "hessian" else f":{prefix}")
        self.subset_size, self.subset_seed = subset_size, subset_seed
        self.batch_size, self.k, self.smallest = batch_size, k, smallest
        self.tol, self.stop, self.max_iter = tol, stop, max_iter
        self.warm_start, self.warm_start_checkpoint_mb = warm_start, warm_start_checkpoint_mb
        self.float64 = float64
        self.trace, self.trace_rtol, self.trace_max_samples = trace, trace_rtol, trace_max_samples
        self.bn_mode, self.seed = bn_mode, seed
        self.progress_after_s = progress_after_s
        self._data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # warm start: the previous measurement's combined Ritz vector (float64, CPU), the product
        # count of the last cold measurement, and whether the next one must be cold
        self._start: torch.Tensor | None = None
        self._cold_hvp: int | None = None
        self._next_cold = False
        # products (callbacks/hessian_products.py), decided once for the run, and what the record keeps
        self._hvp = None if hvp == "auto" else hvp
        self._batch = None if batch_size == "auto" else batch_size
        self._hvp_checked = hvp == "double_backward" or operator not in products.HESSIAN_OPERATORS
        self._products_note, self._products_recorded = {}, False

    # ---- the measurement, usable without a Trainer (see measure.py) -------------------------
    def measure(
        self,
        model: nn.Module,
        loss_fn,
        x: torch.Tensor,
        y: torch.Tensor,
        progress: Callable[[LanczosProgress], None] | None = None,
        where: str = "",
        idx: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Spectrum (and trace) of ``loss_fn(model(x), y)`` on this rank's ``(x, y)``, in ``bn_mode``.

        Warm-starts from the previous call's Ritz vectors when ``warm_start`` (see the class);
        ``progress`` receives each Lanczos step (:class:`~measures.linalg.LanczosProgress`). A
        measurement short of its stop is warned about (:meth:`convergence_warnings`), ``where``
        (e.g. "epoch 3") saying which one. ``idx``: the samples' dataset indices (the MC Fisher's
        draws; default their positions).
        """
        start_time = time.perf_counter()
        if self.float64:
            model = copy.deepcopy(model).double()
            x = x.double()
        self.check_hvp(model, loss_fn, x, y)
        with gradients_enabled(), preserved_module_state(model, mode=self.bn_mode):
            # one operator for both: the forward pass and first backward are cached once
            idx = torch.arange(len(x)) if idx is None else idx
            batches = split_batches(x, y, self.batch_size_for(model, loss_fn, x, y), idx.to(x.device))
            self._hvp, hvp_metrics, note = products.measurement_hvp(
                self._hvp, self.operator, model, loss_fn, batches, self.prefix, self._label
            )
            self._products_note.update(note)
            op = curvature_operator(self.operator, model, loss_fn, batches, seed=self.seed, hvp=self.hvp_mode)
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
                    estimator = hutchinson_trace
                    if self.trace_method == "hutchpp":
                        estimator = functools.partial(hutchpp_trace, sketch=HUTCHPP_SKETCH)
                    tr = estimator(
                        op,
                        rtol=self.trace_rtol,
                        min_samples=TRACE_MIN_SAMPLES,
                        max_samples=self.trace_max_samples,
                        seed=self.seed,
                    )
                layers = None
                if self.blocks is not None:
                    layers = block_spectra(
                        op, parameter_blocks(model, self.blocks), tol=self.tol, max_iter=self.max_iter,
                        seed=self.seed, trace=self.trace, trace_rtol=self.trace_rtol,
                        min_samples=TRACE_MIN_SAMPLES, max_samples=self.trace_max_samples,
                    )  # fmt: skip
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
        metrics[f"{p}/converged"] = float(eig.converged and (tr is None or tr.converged))
        metrics[f"{p}/warm"] = float(eig.warm)
        if tr is not None:
            metrics[f"{p}/trace"], metrics[f"{p}/trace_stderr"] = tr.trace, tr.stderr
            metrics[f"{p}/trace_converged"] = float(tr.converged)
        for name, values in (layers or {}).items():
            metrics.update({f"{p}/layer/{name}/{k}": v for k, v in values.items() if k != "n_hvp"})
            metrics[f"{p}/layer_n_hvp"] = values["n_hvp"]
        metrics[f"{p}/n_hvp"] = float(op.n_hvp)
        metrics.update(hvp_metrics)
        metrics[f"{p}/seconds"] = time.perf_counter() - start_time
        for message in self.convergence_warnings(metrics, eig.converged, where):
            rank_zero_warn(message)
        return metrics

    @property
    def hvp_mode(self) -> str:
        """The Hessian-vector products' mode (double backward until ``auto`` has timed both)."""
        return self._hvp or products.HVP_MODES[0]

    def batch_size_for(self, model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> int:
        """The samples per forward pass: ``batch_size``, or what ``auto`` means for this model and
        device (:mod:`callbacks.hessian_products`), decided at the first call and kept."""
        if self._batch is None:
            self._batch = products.resolved_batch_size(self.batch_size, model, loss_fn, x, y, self.bn_mode)
        return self._batch

    def check_hvp(self, model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> None:
        """Once, before the first measurement: can torch.func run the model (hvp)? See the module."""
        if self._hvp_checked:
            return
        self._hvp_checked = True
        why = products.forward_over_reverse_refusal(model, loss_fn, x, y, self.hvp, self.bn_mode, self._label)
        if why is not None:
            self._hvp, self._products_note["hvp_fallback_reason"] = products.HVP_MODES[0], why

    def convergence_warnings(
        self, metrics: dict[str, float], lanczos_converged: bool, where: str = ""
    ) -> list[str]:
        """What to tell a user when a measurement missed its stop: the error reached, the
        tolerance, and the settings that buy accuracy. Empty when every stop was reached."""
        p, at = self.prefix, f" at {where}" if where else ""
        name = type(self).__name__ + ("" if p == "hessian" else f":{p}")
        out = []
        if not lanczos_converged:
            out.append(
                f"[{name}] UNCONVERGED{at}: eigenvalues' estimated error {metrics[f'{p}/rel_error']:.3g} of "
                f"|lambda_1| > tol {self.tol:g} after {int(metrics[f'{p}/n_hvp'])} products (max_iter "
                f"{self.max_iter}): the logged {p}/lambda_* are not accurate to tol. Raise "
                f"callbacks.{p}.max_iter, or loosen callbacks.{p}.tol."
            )
        if metrics.get(f"{p}/trace_converged", 1.0) < 1:
            out.append(
                f"[{name}] UNCONVERGED{at}: trace standard error {metrics[f'{p}/trace_stderr']:.3g} > "
                f"trace_rtol {self.trace_rtol:g} x |trace| {abs(metrics[f'{p}/trace']):.3g} after "
                f"{self.trace_max_samples} samples. Raise callbacks.{p}.trace_max_samples, or loosen "
                f"callbacks.{p}.trace_rtol."
            )
        return out

    def check_against(self, model: nn.Module, datamodule) -> None:
        """Refuse, before training, what the model and data cannot give: more eigenvalues than
        parameters, a subset larger than the training set."""
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n = self.k + int(self.smallest)
        check(
            n <= dim,
            "k",
            self.k,
            f"the model has {dim} parameters, so the Hessian has {dim} eigenvalues "
            f"(k + smallest = {n} asked)",
        )
        if self.blocks is not None:
            parameter_blocks(model, self.blocks)  # refuses patterns that match nothing, naming them
        self.check_subset(datamodule, "train", self.subset_size)

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
        x, y, idx = load_rank_subset(
            dataset, self.subset_size, self.subset_seed, trainer.global_rank, trainer.world_size
        )
        if self.float64 and not isinstance(getattr(pl_module, "net", None), nn.Module):
            raise ConfigError(
                "float64",
                True,
                f"needs the network as {type(pl_module).__name__}.net (to measure a float64 copy)",
            )
        self._data = (x, y, idx)
        # before training: can torch.func run the model (hvp)? Two samples, the same on every rank
        x2, y2 = load_items(dataset, torch.arange(min(2, len(dataset))))
        dtype = next(pl_module.parameters()).dtype
        loss_fn = getattr(pl_module, "loss_fn", None) or nn.functional.cross_entropy
        self.check_hvp(pl_module, loss_fn, x2.to(dtype), y2)
        rank_zero_info(
            f"[HessianSpectrum:{self.prefix}] top-{self.k} {self.operator} eigenvalues"
            f"{f' (and per layer: {self.blocks})' if self.blocks is not None else ''} on {min(self.subset_size or len(dataset), len(dataset))} "
            f"fixed training samples (BatchNorm in {self.bn_mode} mode) {self.schedule}, "
            f"to {self.tol:g} of |λ_1| ({self.stop} stop{', warm-started' if self.warm_start else ''})"
        )

    def measure_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        param = next(pl_module.parameters())
        x, y, idx = (t.to(param.device) for t in self._data)
        loss_fn = getattr(pl_module, "loss_fn", None) or nn.functional.cross_entropy
        model = pl_module.net if self.float64 else pl_module  # a copy of the network is converted
        progress = None
        if self.progress_after_s is not None:
            label = f"[{self._label}] epoch {trainer.current_epoch}"
            progress = ProgressLines(label, rank_zero_info, after_s=self.progress_after_s)
        metrics = self.measure(
            model, loss_fn, x.to(param.dtype), y, progress, f"epoch {trainer.current_epoch}", idx
        )
        if not self._products_recorded:  # once per process: the batch size, hvp, its timings
            hvp = {"hvp": self.hvp_mode} if self.operator in products.HESSIAN_OPERATORS else {}
            note = {"batch_size": self._batch, **hvp, **self._products_note}
            annotate_run(trainer, **{f"{self.prefix}_products": note})
            self._products_recorded = True
        return metrics

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(cold_hvp=self._cold_hvp, next_cold=self._next_cold)
        state["products"] = {"hvp": self._hvp, "batch": self._batch, "note": dict(self._products_note)}
        if self._start is not None and self._start.numel() * 8 <= self.warm_start_checkpoint_mb * 2**20:
            state["start_vector"] = self._start.clone()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._cold_hvp = state_dict.get("cold_hvp")
        self._next_cold = bool(state_dict.get("next_cold", False))
        saved = state_dict.get("products") or {}
        if self.hvp == "auto" and saved.get("hvp") is not None:  # a config's explicit choice wins
            self._hvp, self._products_note = saved["hvp"], dict(saved.get("note") or {})
        if self.batch_size == "auto" and saved.get("batch") is not None:
            self._batch = saved["batch"]
        start = state_dict.get("start_vector")
        self._start = None if start is None else start.to("cpu", torch.float64)


class GGNSpectrum(HessianSpectrum):
    """:class:`HessianSpectrum` with other defaults: the generalized Gauss-Newton, logged as ``ggn/*``,
    with its trace and per-layer blocks (``conf/callbacks/ggn.yaml``; ``'callbacks=[default,ggn]'``
    adds it beside the Hessian).

    Args:
        the same as :class:`HessianSpectrum`, by name; the defaults differ in ``prefix`` (ggn),
        ``operator`` (ggn), ``trace`` (true) and ``blocks`` (module).
    """

    DEFAULTS = {"prefix": "ggn", "operator": "ggn", "trace": True, "blocks": "module"}

    def __init__(self, **kwargs):
        super().__init__(**{**self.DEFAULTS, **kwargs})


GGNSpectrum.__init__.__signature__ = inspect.signature(HessianSpectrum.__init__).replace(
    parameters=[
        p.replace(default=GGNSpectrum.DEFAULTS.get(p.name, p.default), kind=p.KEYWORD_ONLY)
        if p.name != "self"
        else p
        for p in inspect.signature(HessianSpectrum.__init__).parameters.values()
    ]
)
