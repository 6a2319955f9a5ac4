"""FGSM and PGD (L∞, L2): the single attacks, their step and projection, and PGD's starts.

With the conventions of :mod:`measures.attacks` (inputs in [0, 1], gradients with respect to the
input only, the model's state left as found by :func:`fgsm` and :func:`pgd`, no global RNG). The
robust-accuracy counts (:func:`measures.attacks.robust_accuracy_counts`) run the same steps
through :func:`pgd_from` and :func:`pgd_fooled_at_any_iterate`, from :func:`per_sample_unit_start`.

Agreement with torchattacks 3.5.1 (``FGSM``, ``PGD``, ``PGDL2``; random start off): same
steps, projection order and clamping; the step differs only where it does not matter.
The loss here is summed over the batch (torchattacks averages it), so each sample's
gradient does not depend on the batch size: the sign (L∞) is unchanged, and the L2 step
``g / (||g|| + 1e-10)`` differs only for gradients of norm ~1e-10 · batch size. The L∞
projection is done as one clamp into ``[max(x - eps, 0), min(x + eps, 1)]``, which equals
torchattacks' ``clamp(x + clamp(adv - x, -eps, eps), 0, 1)`` up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from measures.module_state import autograd_input, gradients_enabled, preserved_module_state
from measures.names import NORMS
from measures.noise import generator_start, sample_normal, sample_uniform

L2_DIVISION_EPS = 1e-10  # torchattacks' ``eps_for_division`` in the normalized L2 step


# --------------------------------------------------------------------------- primitives


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx of the summed cross-entropy (so each row is that sample's own gradient)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def _linf_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the L∞ ball around ``x`` intersected with [0, 1]."""
    return (x - eps).clamp_(min=0), (x + eps).clamp_(max=1)


def _pgd_step(
    adv: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    eps: float,
    alpha: float,
    norm: str,
    box: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """One ascent step followed by projection on the eps-ball and on [0, 1]."""
    if norm == "linf":
        return (adv + alpha * grad.sign()).clamp_(box[0], box[1])
    grad = grad / (_flat_norm(grad) + L2_DIVISION_EPS)
    delta = adv + alpha * grad - x
    factor = torch.clamp(eps / _flat_norm(delta), max=1.0)  # eps / 0 = inf -> 1
    return (x + delta * factor).clamp_(0, 1)


# --------------------------------------------------------------------------- starts


def _torchattacks_unit(norm: str):
    """PGD's perturbation for eps = 1 out of ``generator_start``'s draw, as torchattacks makes it.

    L∞: the uniform draw itself. L2: its direction times a radius uniform in [0, 1]
    (torchattacks' choice; not uniform in the ball).
    """

    def unit(t: torch.Tensor, uniform) -> torch.Tensor:
        if norm == "linf":
            return t
        radius = uniform((len(t),) + (1,) * (t.dim() - 1))
        return t * radius / _flat_norm(t)

    return unit


def per_sample_unit_start(x: torch.Tensor, idx: torch.Tensor, seed: int, norm: str) -> torch.Tensor:
    """Random-start perturbation for eps = 1, each sample's a function of (seed, idx) only.

    L∞: uniform in [-1, 1] per pixel. L2: uniform direction (Box-Muller normals, normalized)
    times a radius uniform in [0, 1], as torchattacks' ``PGDL2``. Multiply by eps to use.
    """
    n, d = len(x), x[0].numel()
    if norm == "linf":
        unit = sample_uniform(idx, seed, 0, d, x.dtype, x.device) * 2 - 1
    else:
        z = sample_normal(idx, seed, 1, d, x.dtype, x.device)  # streams 1 and 2
        radius = sample_uniform(idx, seed, 3, 1, x.dtype, x.device)
        unit = z / z.norm(dim=1, keepdim=True) * radius
    return unit.view(n, *x.shape[1:])


# --------------------------------------------------------------------------- attacks


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """FGSM (Goodfellow et al.): ``clamp(x + eps · sign(∇x CE), 0, 1)``, detached.

    Matches ``torchattacks.FGSM`` on the same model in the same mode. Leaves the model's
    mode, ``.grad``, buffers and the global RNG as found; runs under no_grad/inference_mode.
    """
    with gradients_enabled(), preserved_module_state(model):
        x, y = autograd_input(x), autograd_input(y)
        grad = input_gradient(model, x, y)
        return (x + eps * grad.sign()).clamp_(0, 1).detach()


def pgd_from(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
) -> torch.Tensor:
    """``steps`` PGD iterations from ``start`` (no state handling; the callers do it)."""
    box = _linf_box(x, eps) if norm == "linf" else None
    adv = start
    for _ in range(steps):
        grad = input_gradient(model, adv, y)
        adv = _pgd_step(adv.detach(), grad, x, eps, alpha, norm, box)
    return adv.detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    *,
    norm: str = "linf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al.) in the L∞ or L2 ball, detached result.

    Each step: ``adv += step_size · sign(g)`` (L∞) or ``step_size · g / (||g|| + 1e-10)``
    (L2), then projection on the eps-ball around ``x`` and clamping to [0, 1]. The random
    start is drawn from ``generator`` (a generator seeded with 0 when ``None``; the global
    RNG is never used): L∞ uniform in [-eps, eps] per pixel, L2 a uniform direction with a
    radius uniform in [0, eps], as torchattacks draws them. With ``random_start=False`` it
    matches ``torchattacks.PGD`` / ``torchattacks.PGDL2``. Leaves the model's mode, ``.grad``,
    buffers and the global RNG as found; runs under no_grad/inference_mode.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    with gradients_enabled(), preserved_module_state(model):
        x, y = autograd_input(x), autograd_input(y)
        start = generator_start(x, eps, norm, generator, _torchattacks_unit(norm)) if random_start else x
        return pgd_from(model, x, y, start, eps, step_size, steps, norm)


def pgd_fooled_at_any_iterate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    work,
    compact: bool | None = None,
) -> torch.Tensor:
    """Which samples are misclassified at ANY PGD iterate (start, step 1, ..., step ``steps``).

    Each iterate's logits serve both the check and the next gradient. ``compact=True``: a sample
    leaves the batch as soon as one iterate fools the model, the others keep iterating exactly as
    they would in the full batch (eval mode: samples are independent), so the work shrinks, at
    the price of a device-to-host sync and a gather per step that breaks one. ``compact=False``:
    every sample takes every step and a mask collects the fooled ones (same result, no sync until
    the end: what pays on a launch-bound GPU). ``None``: compact on a CPU, not on other devices
    (``benchmarks/gpu_check.py`` times both on the device at hand). No state handling (the
    caller's); ``work``: a :class:`measures.attacks.AttackWork` increased by the work done.
    """
    if compact is None:
        compact = x.device.type == "cpu"
    if not compact:
        return _fooled_at_any_iterate_in_full(model, x, y, start, eps, alpha, steps, norm, work)
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    active = torch.arange(len(x), device=x.device)
    box = _linf_box(x, eps) if norm == "linf" else None
    adv = start.detach()
    for k in range(steps + 1):
        last = k == steps
        with torch.set_grad_enabled(not last):
            adv.requires_grad_(not last)
            logits = model(adv)
        fooled = logits.argmax(dim=1) != y
        if bool(fooled.any()):
            broken[active[fooled]] = True
            keep = ~fooled
            active, x, y = active[keep], x[keep], y[keep]
            box = None if box is None else (box[0][keep], box[1][keep])
        else:
            keep = None
        # Counted per sample (so the same for any batching): a gradient for each sample that takes a
        # step, a forward for each that is fooled or at its last iterate. (The backward pass runs over
        # the whole batch's graph, the fooled rows with a zero gradient.)
        if last or len(active) == 0:
            work.forwards += len(logits)
            break
        work.gradients += len(active)
        work.forwards += len(logits) - len(active)
        logits = logits if keep is None else logits[keep]
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), adv)
        adv = adv.detach()
        if keep is not None:
            adv, grad = adv[keep], grad[keep]
        adv = _pgd_step(adv, grad, x, eps, alpha, norm, box)
    return broken


def _fooled_at_any_iterate_in_full(model, x, y, start, eps, alpha, steps, norm, work) -> torch.Tensor:
    """:func:`pgd_fooled_at_any_iterate` without compaction: every sample takes every step."""
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    box = _linf_box(x, eps) if norm == "linf" else None
    adv = start.detach()
    for k in range(steps + 1):
        last = k == steps
        with torch.set_grad_enabled(not last):
            adv.requires_grad_(not last)
            logits = model(adv)
        broken |= logits.argmax(dim=1) != y
        if last:
            work.forwards += len(x)
            break
        work.gradients += len(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), adv)
        adv = _pgd_step(adv.detach(), grad, x, eps, alpha, norm, box)
    return broken


def pgd_iterates(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Every iterate of L∞ PGD (start, step 1, ..., step ``steps``), from the per-sample random start
    the robust-accuracy counts use (:func:`measures.attacks.per_sample_unit_start` with the same
    ``seed``): the points the attack's inner loop visits. The model's mode is the caller's."""
    with gradients_enabled():
        x, y = autograd_input(x), autograd_input(y)
        adv = (x + eps * per_sample_unit_start(x, index, seed, "linf")).clamp(0, 1)
        box = _linf_box(x, eps)
        path = [adv.detach()]
        for _ in range(steps):
            grad = input_gradient(model, adv, y)
            adv = _pgd_step(adv.detach(), grad, x, eps, step_size, "linf", box)
            path.append(adv.detach())
    return path
