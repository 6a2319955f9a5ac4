"""How :class:`~callbacks.hessian_spectrum.HessianSpectrum` computes its products: the samples per
forward pass (``batch_size``) and the way of computing a Hessian-vector product (``hvp``).

- ``batch_size``: a number, or ``"auto"``: :data:`~measures.hvp.CPU_BATCH_SIZE` on a CPU and with
  ``bn_mode="train"`` (there the batch defines BatchNorm's statistics, so it must not depend on the
  device); on a CUDA device in eval mode, at the first measurement, as many samples as a quarter of
  the free device memory holds (:func:`measures.hvp.auto_batch_size`).
- ``hvp``: ``double_backward``, ``forward_over_reverse`` or ``auto``: at the first measurement
  :func:`measures.hessian.fastest_hvp` times one product of each on the measurement's first batch (the
  times summed over ranks: every rank chooses the same) and the faster is kept. Before that,
  :func:`forward_over_reverse_refusal` runs one forward-over-reverse product on 2 samples: where
  torch.func cannot run the model, ``auto`` falls back to double backward (warned, and recorded)
  and ``forward_over_reverse`` is refused (:class:`~lightning_modules.config.ConfigError`).

The callback keeps both decisions for the run (in its checkpoint, so a resumed run measures exactly
as an uninterrupted one).
"""

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


def check_product_settings(batch_size, hvp, operator: str) -> None:
    """Refuse a ``batch_size`` or ``hvp`` that cannot work, naming what is allowed."""
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


def forward_over_reverse_refusal(
    model: nn.Module, loss_fn, x, y, hvp: str, bn_mode: str, name: str
) -> str | None:
    """Why torch.func cannot run ``model`` (one product on the first 2 samples, in ``bn_mode``), or
    None. With ``hvp="forward_over_reverse"`` a reason is raised as a :class:`ConfigError`; with
    ``auto`` it is warned about (``name``: the callback's)."""
    with preserved_module_state(model, mode=bn_mode):
        why = forward_over_reverse_error(model, loss_fn, x[:2], y[:2])
    if why is not None and hvp == "forward_over_reverse":
        raise ConfigError(
            "hvp",
            hvp,
            f"torch.func cannot run this model ({why}); use double_backward (or auto, which falls back to it)",
        )
    if why is not None:
        warn_fallback(name, why)
    return why


def warn_fallback(name: str, why: str) -> None:
    rank_zero_warn(
        f"[{name}] hvp=auto: torch.func cannot compute forward-over-reverse products of this model "
        f"({why}); the Hessian-vector products use double backward"
    )


def resolved_batch_size(batch_size, model: nn.Module, loss_fn, x, y, bn_mode: str) -> int:
    """``batch_size``, or what ``auto`` means for ``model`` (in the mode it is measured in)."""
    if batch_size != "auto":
        return batch_size
    if bn_mode == "train":
        return CPU_BATCH_SIZE
    with preserved_module_state(model, mode=bn_mode):
        return auto_batch_size(model, loss_fn, x, y)


def measurement_hvp(
    mode: str | None, operator: str, model: nn.Module, loss_fn, batches: list, prefix: str, name: str
) -> tuple[str, dict, dict]:
    """The mode of one measurement's products (``mode``; None: ``auto`` not yet decided), the
    metrics that say it, and what the record keeps of a decision taken now.

    Metrics: ``<prefix>/hvp_forward_over_reverse`` (1 or 0) for the Hessian operators and, when
    ``auto`` times the modes here, ``<prefix>/hvp_ms_<mode>`` (one product, ms); the record: the
    timings and any fallback's reason."""
    if operator not in HESSIAN_OPERATORS:
        return HVP_MODES[0], {}, {}
    metrics, note = {}, {}
    if mode is None:
        mode, metrics, note = timed_choice(model, loss_fn, batches, prefix, name)
    return mode, {**metrics, f"{prefix}/hvp_forward_over_reverse": float(mode == HVP_MODES[1])}, note


def timed_choice(model: nn.Module, loss_fn, batches: list, prefix: str, name: str) -> tuple[str, dict, dict]:
    """``hvp=auto`` at the first measurement: (the faster mode, the metrics ``<prefix>/hvp_ms_<mode>``
    of one product in ms, what the record keeps: the timings and any fallback's reason). Timed on the
    first sub-batch only: the modes' cost per sample is what decides, and timing every sub-batch
    cost a CPU default run 0.5 s of its 7 s of Hessian measurements."""
    choice = fastest_hvp(model, loss_fn, [b[:2] for b in batches[:1]])
    note = {f"hvp_ms_{m}": ms for m, ms in choice.ms.items()}
    if choice.reason is not None:
        warn_fallback(name, choice.reason)
        note["hvp_fallback_reason"] = choice.reason
    timings = ", ".join(f"{m} {ms:.1f} ms" for m, ms in choice.ms.items())
    rank_zero_info(f"[{name}] hvp=auto: {choice.mode} (one product: {timings})")
    return choice.mode, {f"{prefix}/hvp_ms_{m}": ms for m, ms in choice.ms.items()}, note
