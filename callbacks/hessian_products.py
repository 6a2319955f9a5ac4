"""How :class:`~callbacks.hessian_spectrum.HessianSpectrum` computes its products: the samples per
forward pass (``batch_size``) and the way of computing a Hessian-vector product (``hvp``)."""

from __future__ import annotations

from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_modules.config import ConfigError, check
from measures.hessian import fastest_hvp
from measures.hvp import CPU_BATCH_SIZE, HVP_MODES, auto_batch_size, forward_over_reverse_error
from measures.module_state import preserved_module_state

HVP_CHOICES = ("auto", *HVP_MODES)
"""The callback's ``hvp`` values: ``auto`` times both modes of :data:`measures.hvp.HVP_MODES`."""
HESSIAN_OPERATORS = ("hessian", "functional")
"""The operators whose products are Hessian-vector products (the others ignore ``hvp``)."""


class ProductPlan:
    """The batch size and the Hessian-vector product mode of one measurement callback.

    - ``batch_size``: a number, or ``"auto"``: :data:`~measures.hvp.CPU_BATCH_SIZE` on a CPU and
      with ``bn_mode="train"`` (there the batch defines BatchNorm's statistics, so it must not
      depend on the device); on a CUDA device in eval mode, at the first measurement, as many
      samples as a quarter of the free device memory holds (:func:`measures.hvp.auto_batch_size`),
      kept for the run.
    - ``hvp``: ``double_backward``, ``forward_over_reverse`` or ``auto``: at the first measurement
      :func:`measures.hessian.fastest_hvp` times one product of each on the measurement's batches
      (the times summed over ranks: every rank chooses the same) and the faster is kept for the
      run. Before that, :meth:`check_model` runs one
      forward-over-reverse product on 2 samples: where torch.func cannot run the model, ``auto``
      falls back to double backward (warned, and recorded) and ``forward_over_reverse`` is refused
      (:class:`ConfigError`).

    Both decisions are checkpointed (:meth:`state_dict`), so a resumed run measures exactly as an
    uninterrupted one, unless its config sets them explicitly.
    """

    def __init__(self, batch_size: int | str, hvp: str, operator: str, bn_mode: str, name: str):
        check(
            batch_size == "auto"
            or (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1),
            "batch_size",
            batch_size,
            f"must be a positive integer or auto ({CPU_BATCH_SIZE} on a CPU, from the free memory on a GPU)",
        )
        check(hvp in HVP_CHOICES, "hvp", hvp, f"allowed: {', '.join(HVP_CHOICES)}")
        check(
            hvp == "auto" or operator in HESSIAN_OPERATORS,
            "hvp",
            hvp,
            f"applies to operator {' or '.join(HESSIAN_OPERATORS)} only (operator is {operator}): leave it auto",
        )
        self.batch_size, self.hvp, self.operator, self.bn_mode, self.name = (
            batch_size,
            hvp,
            operator,
            bn_mode,
            name,
        )
        self.mode: str | None = None if hvp == "auto" else hvp  # decided: the mode in use
        self.batch: int | None = None if batch_size == "auto" else batch_size
        self.checked = hvp == "double_backward" or operator not in HESSIAN_OPERATORS
        self._note: dict = {}  # timings and fallback reason, for the record
        self._recorded = False

    def check_model(self, model: nn.Module, loss_fn, x, y) -> None:
        """Once: can torch.func run ``model`` (one product on the first 2 samples, in ``bn_mode``)?"""
        if self.checked:
            return
        self.checked = True
        with preserved_module_state(model, mode=self.bn_mode):
            why = forward_over_reverse_error(model, loss_fn, x[:2], y[:2])
        if why is None:
            return
        if self.hvp == "forward_over_reverse":
            raise ConfigError(
                "hvp",
                self.hvp,
                f"torch.func cannot run this model ({why}); use double_backward (or auto, which falls back to it)",
            )
        self._fall_back(why)

    def _fall_back(self, why: str) -> None:
        self.mode, self._note["hvp_fallback_reason"] = "double_backward", why
        rank_zero_warn(
            f"[{self.name}] hvp=auto: torch.func cannot compute forward-over-reverse products of this "
            f"model ({why}); the Hessian-vector products use double backward"
        )

    def batch_size_for(self, model: nn.Module, loss_fn, x, y) -> int:
        """The samples per forward pass (``model`` in the mode it is measured in)."""
        if self.batch is None:
            self.batch = CPU_BATCH_SIZE if self.bn_mode == "train" else auto_batch_size(model, loss_fn, x, y)
        return self.batch

    def mode_for(self, model: nn.Module, loss_fn, batches: list, prefix: str) -> tuple[str, dict[str, float]]:
        """The product mode of this measurement and the metrics that say it: ``<prefix>/hvp_forward_over_reverse``
        (1 or 0), and once, when ``auto`` timed the modes, ``<prefix>/hvp_ms_<mode>`` (one product, ms)."""
        if self.operator not in HESSIAN_OPERATORS:
            return "double_backward", {}
        metrics = {}
        if self.mode is None:
            choice = fastest_hvp(model, loss_fn, [b[:2] for b in batches])
            self.mode = choice.mode
            metrics = {f"{prefix}/hvp_ms_{m}": ms for m, ms in choice.ms.items()}
            self._note.update({f"hvp_ms_{m}": ms for m, ms in choice.ms.items()})
            if choice.reason is not None:
                self._fall_back(choice.reason)
            rank_zero_info(
                f"[{self.name}] hvp=auto: {choice.mode} (one product: "
                + ", ".join(f"{m} {ms:.1f} ms" for m, ms in choice.ms.items())
                + ")"
            )
        metrics[f"{prefix}/hvp_forward_over_reverse"] = float(self.mode == "forward_over_reverse")
        return self.mode, metrics

    def state_dict(self) -> dict:
        return {"hvp_mode": self.mode, "batch": self.batch, "note": dict(self._note)}

    def load_state_dict(self, state: dict) -> None:
        if self.hvp == "auto" and state.get("hvp_mode") is not None:
            self.mode, self._note = state["hvp_mode"], dict(state.get("note") or {})
        if self.batch_size == "auto" and state.get("batch") is not None:
            self.batch = state["batch"]

    def take_note(self) -> dict | None:
        """Once per process, after the first measurement: what the record keeps of the choices
        (``batch_size``, ``hvp`` and, where they apply, the timings and a fallback's reason)."""
        if self._recorded or self.batch is None:
            return None
        self._recorded = True
        hvp = {"hvp": self.mode} if self.operator in HESSIAN_OPERATORS else {}
        return {"batch_size": self.batch, **hvp, **self._note}
