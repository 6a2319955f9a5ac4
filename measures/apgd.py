"""Auto-PGD (Croce & Hein 2020): APGD on cross-entropy and targeted APGD on the DLR loss.

AutoAttack's first two attacks, in plain torch, with the conventions of :mod:`measures.attacks`
(inputs in [0, 1], gradients with respect to the input only, the model's state left as found,
usable under ``no_grad``/``inference_mode``, no global RNG).

- :func:`apgd`: APGD-CE, torchattacks' ``APGD(loss="ce")`` (one restart);
- :func:`apgd_targeted`: APGD-T, torchattacks' ``APGDT``: one run per target class, the
  classes ranked 2nd, 3rd, ... by the clean logits (``n_target_classes``, 9 by default), on the
  targeted DLR loss ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)``;
- :func:`apgd_single_run`: one run from a given start (torchattacks' ``attack_single_run``);
- :func:`apgd_robust`: which samples withstand an attack, for the robust-accuracy counts
  (:func:`measures.attacks.robust_accuracy_counts` with ``AttackSpec("apgdce" | "apgdt", ...)``).

The algorithm (Croce & Hein 2020, Alg. 1) as their code (``fra31/auto-attack``) and torchattacks
3.5.1 run it: the first step has size 2·eps and no momentum, every later step is
``x + 0.75 (z - x) + 0.25 (x - x_prev)`` with ``z`` the projected (sign or L2-normalized) gradient
step; at checkpoints after ``0.22 n_iter`` iterations, then ever closer (the distance shrinks by
``0.03 n_iter`` down to ``0.06 n_iter``), a sample's step size is halved and it restarts from its
best point when the loss went up in at most ``rho`` (0.75) of the steps since the last checkpoint,
or when the previous checkpoint did not halve and the best loss has not improved since.

Where the reference code differs from the paper's text, this follows the code (its numbers are
AutoAttack's numbers): checkpoint distances are rounded down (``int``), not up; "went up in at
most rho of the steps" is ``<=`` (the paper: ``<``); and at the first checkpoint the step from
the start compares the first iterate's loss with 0 (the code's loss history wraps around to a
row not yet filled), not with the loss at the start. Where torchattacks differs from the
reference code, this follows the reference: APGD-T in L2 uses every sample's own step size
(torchattacks uses the first sample's for the whole batch), and losses and step sizes stay in
the input's dtype (torchattacks keeps them in float32, so in float64 the two differ by rounding).
Not implemented: restarts beyond one, EOT, the L1 version, untargeted DLR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from measures.module_state import autograd_input, gradients_enabled, preserved_module_state
from measures.names import NORMS
from measures.noise import generator_start, sample_normal, sample_uniform

MOMENTUM = 0.75  # the paper's alpha: weight of the new step (the first step has none)
DIVISION_EPS = 1e-12  # the reference code's guard in normalizations and the DLR denominator
_START_STREAM = 16  # noise streams of APGD's per-sample starts: 16 + 2·run (+1); PGD uses 0-3


@dataclass
class APGDRun:
    """The result of one APGD run (per sample).

    ``x_best``/``loss_best``: the point of highest loss and its loss (the paper's output);
    ``correct_at_best``: whether the model classifies ``x_best`` correctly; ``robust``: correct at
    the start and at every iterate (AutoAttack's count); ``x_fooled``: the last iterate that fooled
    the model (the start where none did; torchattacks' ``x_best_adv``). With ``early_exit`` a
    sample leaves at the first iterate that fools it: its ``x_fooled`` is that iterate and its
    ``x_best``/``loss_best`` are those of that moment.
    """

    x_best: torch.Tensor
    loss_best: torch.Tensor
    correct_at_best: torch.Tensor
    robust: torch.Tensor
    x_fooled: torch.Tensor


def checkpoint_lengths(n_iter: int) -> tuple[int, int, int]:
    """(first distance, smallest distance, decrease) between checkpoints: 22%, 6%, 3% of ``n_iter``."""
    return max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss per sample: ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12)``.

    ``z_(k)``: the k-th largest logit. Invariant to shifting and scaling the logits; needs at
    least 4 classes. Written as torchattacks writes it (the same rounding).
    """
    z_sorted = logits.sort(dim=1)[0]
    rows = torch.arange(len(logits), device=logits.device)
    return -(logits[rows, y] - logits[rows, y_target]) / (
        z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + DIVISION_EPS
    )


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (x.dim() - 1)))


def _l2(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, keepdim (summed over dims 1.. as the reference code sums)."""
    return (t**2).sum(dim=tuple(range(1, t.dim())), keepdim=True).sqrt()


def _unit_direction(t: torch.Tensor, norm: str) -> torch.Tensor:
    """``t`` scaled to unit L∞ (``t / max |t|``) or unit L2 norm, per sample: the start direction."""
    if norm == "linf":
        return t / _per_sample(t.flatten(1).abs().amax(dim=1), t)
    return t / (_l2(t) + DIVISION_EPS)


def apgd_unit_start(x: torch.Tensor, idx: torch.Tensor, seed: int, norm: str, run: int) -> torch.Tensor:
    """APGD's start direction for eps = 1, each sample's a function of (seed, idx, run) only.

    As the reference draws it: L∞ uniform in [-1, 1] per pixel, divided by its largest entry
    (so one pixel is at the boundary); L2 a normal vector scaled to norm 1 (on the sphere).
    ``run``: 0 for APGD-CE, ``j`` for APGD-T's ``j``-th target class (independent starts).
    Start at ``(x + eps * unit).clamp(0, 1)``.
    """
    stream, d = _START_STREAM + 2 * run, x[0].numel()
    if norm == "linf":
        t = sample_uniform(idx, seed, stream, d, x.dtype, x.device) * 2 - 1
    else:
        t = sample_normal(idx, seed, stream, d, x.dtype, x.device)
    return _unit_direction(t.view(x.shape), norm)


def _reference_unit(norm: str):
    """APGD's start direction out of ``generator_start``'s draw, as the reference makes it (as
    :func:`apgd_unit_start`: the uniform draw over its largest entry, or the normal one normalized)."""
    return lambda t, uniform: _unit_direction(t, norm)


def _project(x_new: torch.Tensor, x: torch.Tensor, eps: float, norm: str, guard: bool) -> torch.Tensor:
    """Onto the eps-ball around ``x`` and [0, 1], as the reference writes it (``guard``: the
    ``+ 1e-12`` torchattacks adds to the L2 norm in the second projection of a step)."""
    if norm == "linf":
        return torch.clamp(torch.min(torch.max(x_new, x - eps), x + eps), 0.0, 1.0)
    d = x_new - x
    size = _l2(d)
    return torch.clamp(
        x + d / (size + DIVISION_EPS) * torch.clamp(size + DIVISION_EPS if guard else size, max=eps), 0.0, 1.0
    )


def _step(
    x_adv: torch.Tensor,
    x_prev: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    step_size: torch.Tensor,
    eps: float,
    norm: str,
    a: float,
) -> torch.Tensor:
    """One APGD step: the projected gradient step ``z``, then momentum ``x + a(z - x) + (1 - a)(x - x_prev)``."""
    momentum = x_adv - x_prev
    if norm == "linf":
        z = _project(x_adv + step_size * torch.sign(grad), x, eps, norm, guard=False)
    else:
        z = _project(x_adv + step_size * grad / (_l2(grad) + DIVISION_EPS), x, eps, norm, guard=False)
    return _project(x_adv + (z - x_adv) * a + momentum * (1 - a), x, eps, norm, guard=True)


def _too_few_increases(loss_steps: torch.Tensor, i: int, k: int, rho: float) -> torch.Tensor:
    """Samples whose loss went up in at most ``rho · k`` of the last ``k`` steps (checkpoint at ``i``).

    ``loss_steps[j]``: the loss after step ``j``. Row ``-1`` wraps to the last row, as in the
    reference code (at the first checkpoint that row is still 0).
    """
    ups = torch.zeros(loss_steps.shape[1], dtype=torch.int64, device=loss_steps.device)
    for c in range(k):
        ups += loss_steps[i - c] > loss_steps[i - c - 1]
    return ups <= k * rho


def _apgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    eps: float,
    *,
    norm: str,
    n_iter: int,
    rho: float,
    y_target: torch.Tensor | None,
    early_exit: bool,
    work=None,
) -> APGDRun:
    """One APGD run (no state handling: the callers do it). ``work``: an ``AttackWork`` or None.

    Every per-sample quantity lives in a row of the state; a sample fooled under ``early_exit``
    has its outputs written and its row dropped. The others go on exactly as in the full batch
    (the checkpoint schedule depends on the iteration only; eval mode: samples are independent).
    """
    n = len(x)
    out = APGDRun(
        x_best=start.detach().clone(),
        loss_best=torch.zeros(n, dtype=x.dtype, device=x.device),
        correct_at_best=torch.zeros(n, dtype=torch.bool, device=x.device),
        robust=torch.ones(n, dtype=torch.bool, device=x.device),
        x_fooled=start.detach().clone(),
    )
    active = torch.arange(n, device=x.device)
    first, smallest, decrease = checkpoint_lengths(n_iter)
    k, since_check = first, 0

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        if y_target is None:
            return F.cross_entropy(logits, y, reduction="none")
        return dlr_targeted_loss(logits, y, y_target)

    x_adv = start.detach()
    grad = None
    state: dict[str, torch.Tensor] = {}
    for i in range(-1, n_iter):  # -1: the start
        if i >= 0:
            with torch.no_grad():
                x_new = _step(x_adv, state["x_prev"], grad, x, state["step_size"], eps, norm, 1.0 if i == 0 else MOMENTUM)  # fmt: skip
                state["x_prev"] = x_adv
                x_adv = x_new
        last = i == n_iter - 1
        with torch.set_grad_enabled(not last):
            x_adv.requires_grad_(not last)
            logits = model(x_adv)
            loss = loss_of(logits)
        grad = None if last else torch.autograd.grad(loss.sum(), x_adv)[0]
        x_adv, loss = x_adv.detach(), loss.detach()
        correct = logits.detach().argmax(dim=1) == y
        if work is not None:
            stays = len(x) if not early_exit else int(correct.sum())
            work.gradients += 0 if last else stays
            work.forwards += len(x) if last else len(x) - stays
        fooled = ~correct
        out.robust[active[fooled]] = False
        out.x_fooled[active[fooled]] = x_adv[fooled]
        if i == -1:
            state = {
                "x_prev": x_adv.clone(),
                "x_best": x_adv.clone(),
                "grad_best": grad.clone() if grad is not None else torch.zeros_like(x),
                "loss_best": loss.clone(),
                "correct_best": correct.clone(),
                "step_size": torch.full(
                    (len(x),) + (1,) * (x.dim() - 1), 2.0 * eps, dtype=x.dtype, device=x.device
                ),  # fmt: skip
                "loss_steps": torch.zeros(n_iter, len(x), dtype=loss.dtype, device=x.device),
                "loss_at_check": loss.clone(),
                "halved_at_check": torch.ones(len(x), dtype=torch.bool, device=x.device),
            }
        else:
            state["loss_steps"][i] = loss
            better = loss > state["loss_best"]
            state["x_best"][better] = x_adv[better]
            if grad is not None:
                state["grad_best"][better] = grad[better]
            state["loss_best"][better] = loss[better]
            state["correct_best"][better] = correct[better]
            since_check += 1
            if since_check == k:
                halve = _too_few_increases(state["loss_steps"], i, k, rho)
                halve |= ~state["halved_at_check"] & (state["loss_at_check"] >= state["loss_best"])
                state["halved_at_check"], state["loss_at_check"] = halve.clone(), state["loss_best"].clone()
                state["step_size"][halve] /= 2.0
                x_adv[halve] = state["x_best"][halve]
                if grad is not None:
                    grad[halve] = state["grad_best"][halve]
                since_check, k = 0, max(k - decrease, smallest)
        if early_exit and not last and bool(fooled.any()):
            _write_best(out, state, active, fooled)
            keep = correct
            active, x, y, x_adv = active[keep], x[keep], y[keep], x_adv[keep]
            y_target = None if y_target is None else y_target[keep]
            grad = None if grad is None else grad[keep]
            state = {key: v[:, keep] if key == "loss_steps" else v[keep] for key, v in state.items()}
            if len(active) == 0:
                break
    _write_best(out, state, active, torch.ones(len(active), dtype=torch.bool, device=active.device))
    return out


def _write_best(out: APGDRun, state: dict, active: torch.Tensor, rows: torch.Tensor) -> None:
    """Copy the best point of the state's ``rows`` (a mask over ``active``) into ``out``."""
    out.x_best[active[rows]] = state["x_best"][rows]
    out.loss_best[active[rows]] = state["loss_best"][rows]
    out.correct_at_best[active[rows]] = state["correct_best"][rows]


def apgd_single_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_init: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    n_iter: int = 100,
    rho: float = 0.75,
    y_target: torch.Tensor | None = None,
    early_exit: bool = False,
) -> APGDRun:
    """One APGD run from ``x_init`` (clamped to [0, 1]; it should lie in the eps-ball around ``x``).

    Cross-entropy loss, or the targeted DLR loss towards ``y_target`` when given. Every sample
    is attacked for ``n_iter`` iterations, as torchattacks' ``attack_single_run`` does (with
    ``early_exit`` a sample stops at the first iterate that fools the model: :class:`APGDRun`).
    Leaves the model's mode, ``.grad``, buffers and the global RNG as found.
    """
    _check(norm, n_iter)
    with gradients_enabled(), preserved_module_state(model):
        x, y = autograd_input(x), autograd_input(y)
        y_target = None if y_target is None else autograd_input(y_target)
        start = autograd_input(x_init).clamp(0, 1)
        return _apgd_run(
            model, x, y, start, eps, norm=norm, n_iter=n_iter, rho=rho, y_target=y_target, early_exit=early_exit,
        )  # fmt: skip


def _check(norm: str, n_iter: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if int(n_iter) != n_iter or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")


def _n_targets(n_classes: int, n_target_classes: int) -> int:
    if n_classes < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, the model has {n_classes}")
    if int(n_target_classes) != n_target_classes or n_target_classes < 1:
        raise ValueError(f"n_target_classes must be an integer >= 1, got {n_target_classes!r}")
    return min(n_target_classes, n_classes - 1)


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    n_iter: int = 100,
    rho: float = 0.75,
    x_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """APGD-CE: adversarial examples as torchattacks' ``APGD(loss="ce", n_restarts=1)`` returns them.

    Samples misclassified at clean are returned as they are; the others are attacked from
    ``x_init`` (default: a random start drawn from ``generator``, a generator seeded with 0 when
    ``None``; the global RNG is never used), and a sample fooled at some iterate is returned at
    the last such iterate, the others unchanged. So in eval mode ``model(adv).argmax(1) == y`` is
    exactly "robust": correct at clean and at every iterate. Leaves the model's mode, ``.grad``,
    buffers and the global RNG as found; runs under no_grad/inference_mode.
    """
    _check(norm, n_iter)
    with gradients_enabled(), preserved_module_state(model):
        x, y = autograd_input(x), autograd_input(y)
        start = (
            generator_start(x, eps, norm, generator, _reference_unit(norm))
            if x_init is None
            else autograd_input(x_init)
        )
        adv = x.clone()
        with torch.no_grad():
            robust = model(x).argmax(dim=1) == y
        _attack_robust(
            model, x, y, start, eps, robust, adv, norm=norm, n_iter=n_iter, rho=rho, target_rank=None
        )
        return adv


def apgd_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    n_iter: int = 100,
    n_target_classes: int = 9,
    rho: float = 0.75,
    x_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """APGD-T: adversarial examples as torchattacks' ``APGDT(n_restarts=1)`` returns them.

    For target rank ``r = 2, ..., n_target_classes + 1`` (capped at the number of classes), the
    samples still robust are attacked with the targeted DLR loss towards their clean logits'
    ``r``-th largest class, each run from its own start: ``x_init[r - 2]`` when ``x_init`` has
    one start per target (shape ``(n_targets, *x.shape)``), else ``x_init`` for every target, else
    random starts drawn from ``generator`` (seeded with 0 when ``None``). Returns as :func:`apgd`.
    """
    _check(norm, n_iter)
    with gradients_enabled(), preserved_module_state(model):
        x, y = autograd_input(x), autograd_input(y)
        with torch.no_grad():
            logits = model(x)
        robust = logits.argmax(dim=1) == y
        n_targets = _n_targets(logits.shape[1], n_target_classes)
        adv = x.clone()
        for j in range(n_targets):
            if x_init is None:
                start = generator_start(x, eps, norm, generator, _reference_unit(norm))
            else:
                start = autograd_input(x_init[j] if x_init.dim() == x.dim() + 1 else x_init)
            if not bool(robust.any()):
                break
            _attack_robust(
                model, x, y, start, eps, robust, adv, norm=norm, n_iter=n_iter, rho=rho, target_rank=j + 2
            )
        return adv


def _attack_robust(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    eps: float,
    robust: torch.Tensor,
    adv: torch.Tensor,
    *,
    norm: str,
    n_iter: int,
    rho: float,
    target_rank: int | None,
) -> None:
    """One full run (as torchattacks') on the samples still ``robust``, from ``start``: each one it
    fools leaves ``robust`` and gets its last fooled iterate in ``adv`` (both in place). Cross-entropy,
    or (``target_rank`` r) the targeted DLR loss towards the r-th largest clean logit."""
    rows = robust.nonzero().squeeze(1)
    if len(rows) == 0:
        return
    y_target = None
    if target_rank is not None:
        with torch.no_grad():  # the target ranks, from the clean logits of the samples attacked
            y_target = model(x[rows]).sort(dim=1)[1][:, -target_rank]
    run = _apgd_run(
        model, x[rows], y[rows], start[rows].clamp(0, 1), eps, norm=norm, n_iter=n_iter, rho=rho,
        y_target=y_target, early_exit=False,
    )  # fmt: skip
    broken = rows[~run.robust]
    robust[broken] = False
    adv[broken] = run.x_fooled[~run.robust]


def apgd_robust(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    eps: float,
    *,
    targeted: bool,
    norm: str,
    n_iter: int,
    n_target_classes: int = 9,
    seed: int = 0,
    random_start: bool = True,
    early_exit: bool = True,
    work=None,
) -> torch.Tensor:
    """Which samples withstand APGD-CE (``targeted=False``) or APGD-T: the robust-accuracy count's form.

    Each run's start is a function of (seed, the sample's index ``idx``, the run) only
    (:func:`apgd_unit_start`; ``random_start=False``: the clean input), so the result does not
    depend on batching. ``early_exit=True``: robust = correct at every iterate of every run (as
    AutoAttack counts; a sample leaves at the first iterate that fools it, and APGD-T attacks it
    for the next target only if still robust). ``early_exit=False``: every sample gets every run
    in full, and robust = correct at the best-loss point (the paper's output) of every run.
    Samples are not checked at clean here: the caller passes those it attacks. No state
    handling (the caller's); ``work``: an ``AttackWork`` increased by the work done.
    """
    robust = torch.ones(len(x), dtype=torch.bool, device=x.device)
    if targeted:
        with torch.no_grad():
            logits = model(x)
        if work is not None:
            work.forwards += len(x)
        ranked = logits.sort(dim=1)[1]
        runs = range(1, _n_targets(logits.shape[1], n_target_classes) + 1)
    else:
        runs = range(1)
    for run in runs:
        rows = robust.nonzero().squeeze(1) if early_exit else torch.arange(len(x), device=x.device)
        if len(rows) == 0:
            break
        xs = x[rows]
        start = (
            (xs + eps * apgd_unit_start(xs, idx[rows], seed, norm, run)).clamp(0, 1) if random_start else xs
        )
        result = _apgd_run(
            model, xs, y[rows], start, eps, norm=norm, n_iter=n_iter, rho=0.75,
            y_target=ranked[rows, -(run + 1)] if targeted else None, early_exit=early_exit, work=work,
        )  # fmt: skip
        robust[rows] &= result.robust if early_exit else result.correct_at_best
    return robust
