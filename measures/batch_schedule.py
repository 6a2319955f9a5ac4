"""The ABS / ABSA batch-size rule (Yao, Gholami, Keutzer, Mahoney, "Large batch size training of
neural networks with adversarial training and second-order information"; the authors' HessianFlow
``optimizer/absa.py``), as plain functions: torch-free, unit-tested on scripted sequences.

Once per epoch, while the batch is below its cap, the top Hessian eigenvalue ``λ`` is measured.
The first measurement sets the reference ``λ_ref``. The batch doubles when ``λ <= λ_ref /
trigger`` (``λ_ref`` becomes ``λ``), or when ``duration`` epochs passed without a doubling
(``λ_ref`` kept); it never exceeds ``max_batch``, and once there nothing more is measured. At a
doubling the learning rate is multiplied by the batch ratio (``linear``), its square root
(``sqrt``) or 1 (``none``), and the adversarial ratio (ABSA) halves; the adversarial ratio drops
to 0 for good once it is ``<= 1 / base_batch`` or from epoch ``max_epochs / 2`` on.
"""

from __future__ import annotations

import dataclasses
import math

LR_SCALINGS = ("linear", "sqrt", "none")


@dataclasses.dataclass(frozen=True)
class BatchState:
    """Where the schedule stands after an epoch: the batch (global), the reference eigenvalue, the
    epochs since the last doubling, the lr multiplier and the adversarial ratio."""

    batch_size: int
    lambda_ref: float | None = None
    since_doubling: int = 0
    lr_scale: float = 1.0
    adv_ratio: float = 0.0
    doublings: int = 0


def lr_multiplier(scaling: str, ratio: float) -> float:
    """What the lr is multiplied by when the batch grows by ``ratio``."""
    if scaling == "linear":
        return float(ratio)
    if scaling == "sqrt":
        return math.sqrt(ratio)
    if scaling == "none":
        return 1.0
    raise ValueError(f"lr scaling must be one of {LR_SCALINGS}, got {scaling!r}")


def needs_measurement(state: BatchState, max_batch: int) -> bool:
    """Whether the eigenvalue is measured at this epoch's end (not once the batch is capped)."""
    return state.batch_size < max_batch


def next_state(
    state: BatchState,
    eigenvalue: float | None,
    *,
    max_batch: int,
    duration: int,
    trigger: float = 2.0,
    lr_scaling: str = "linear",
) -> tuple[BatchState, str]:
    """The state for the next epoch, given this epoch's eigenvalue (None: not measured, at the
    cap); and why: ``"capped"``, ``"first"`` (reference set), ``"eigenvalue"``, ``"duration"`` or
    ``"kept"``. The adversarial ratio is halved at a doubling (its stop rule is
    :func:`adversarial_ratio`)."""
    if not needs_measurement(state, max_batch):
        return state, "capped"
    since = state.since_doubling + 1
    ref, why = state.lambda_ref, "kept"
    if ref is None:
        ref, why = eigenvalue, "first"
    elif eigenvalue is not None and eigenvalue <= ref / trigger:
        ref, why = eigenvalue, "eigenvalue"
    if why == "eigenvalue" or since >= duration:
        new_batch = min(2 * state.batch_size, max_batch)
        ratio = new_batch / state.batch_size
        return (
            BatchState(
                batch_size=new_batch,
                lambda_ref=ref,
                since_doubling=0,
                lr_scale=state.lr_scale * lr_multiplier(lr_scaling, ratio),
                adv_ratio=state.adv_ratio / 2,
                doublings=state.doublings + 1,
            ),
            "eigenvalue" if why == "eigenvalue" else "duration",
        )
    return dataclasses.replace(state, lambda_ref=ref, since_doubling=since), why


def adversarial_ratio(ratio: float, epoch: int, max_epochs: int | None, base_batch: int) -> float:
    """The share of each micro-batch made adversarial in ``epoch`` (0-based): ``ratio``, or 0 once
    it is ``<= 1 / base_batch`` or from epoch ``max_epochs / 2`` on (no epoch cap: never by epoch)."""
    if ratio <= 1 / base_batch:
        return 0.0
    if max_epochs is not None and max_epochs > 0 and epoch >= max_epochs / 2:
        return 0.0
    return ratio


def adversarial_count(ratio: float, micro_batch: int) -> int:
    """Samples of a micro-batch replaced by their adversarial example: ``⌊ratio · micro⌋`` (the
    authors' ``int()``), with a guard against ``0.3 · 10 = 2.9999…``."""
    return int(math.floor(ratio * micro_batch + 1e-9))


def schedule(
    eigenvalues: list[float | None],
    *,
    base_batch: int,
    max_batch: int,
    duration: int,
    trigger: float = 2.0,
    lr_scaling: str = "linear",
    adv_ratio: float = 0.0,
) -> list[tuple[BatchState, str]]:
    """The state after each epoch for a scripted sequence of eigenvalues (one per epoch; the
    ones of capped epochs are ignored): what the callback does, without a model."""
    state, out = BatchState(base_batch, adv_ratio=adv_ratio), []
    for lam in eigenvalues:
        state, why = next_state(
            state,
            lam if needs_measurement(state, max_batch) else None,
            max_batch=max_batch,
            duration=duration,
            trigger=trigger,
            lr_scaling=lr_scaling,
        )
        out.append((state, why))
    return out


# ---- the gradient noise scale (McCandlish et al. 2018, appendix A) -------------------------------
POLICIES = ("hessian", "noise_scale")


def noise_estimates(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates of ``|G|²`` (the true gradient's squared norm) and ``tr(Σ)`` (the
    per-example gradient covariance's trace) from the squared norms of two gradients, over
    ``b_small`` and ``b_big > b_small`` samples: ``E|G_B|² = |G|² + tr(Σ)/B`` solved for both."""
    if not b_big > b_small > 0:
        raise ValueError(f"need b_big > b_small > 0, got {b_small} and {b_big}")
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
    return g2, trace


def noise_scale(sum_g2: float, sum_trace: float) -> float:
    """``B_noise = tr(Σ) / |G|²`` as the ratio of the two estimates' running sums (means); NaN when
    ``|G|²`` is not positive (a noisy estimate: no decision)."""
    return sum_trace / sum_g2 if sum_g2 > 0 and math.isfinite(sum_trace) else math.nan


def noise_batch(b_noise: float, base_batch: int, max_batch: int) -> int:
    """The smallest ``base_batch × 2^k >= b_noise``, at most ``max_batch`` (``base_batch`` for a
    non-finite or non-positive ``b_noise``)."""
    if not (math.isfinite(b_noise) and b_noise > base_batch):
        return base_batch
    return min(base_batch * 2 ** math.ceil(math.log2(b_noise / base_batch) - 1e-12), max_batch)


def next_noise_state(
    state: BatchState, b_noise: float, *, base_batch: int, max_batch: int, lr_scaling: str = "linear"
) -> tuple[BatchState, str]:
    """The state after an epoch whose noise scale was ``b_noise``: the batch grows (never shrinks) to
    :func:`noise_batch`, the lr by the batch ratio (as ABS) and the adversarial ratio shrinks by it;
    why: ``"capped"``, ``"noise_scale"`` (grown) or ``"kept"``."""
    if not needs_measurement(state, max_batch):
        return state, "capped"
    new_batch = max(noise_batch(b_noise, base_batch, max_batch), state.batch_size)
    if new_batch == state.batch_size:
        return dataclasses.replace(state, since_doubling=state.since_doubling + 1), "kept"
    ratio = new_batch / state.batch_size
    return (
        BatchState(
            batch_size=new_batch,
            lambda_ref=state.lambda_ref,
            since_doubling=0,
            lr_scale=state.lr_scale * lr_multiplier(lr_scaling, ratio),
            adv_ratio=state.adv_ratio / ratio,
            doublings=state.doublings + round(math.log2(ratio)),
        ),
        "noise_scale",
    )
