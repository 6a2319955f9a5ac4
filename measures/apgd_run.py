"""One APGD run (Croce & Hein 2020, Alg. 1) on a batch of rows: the core of :mod:`measures.apgd`.

A row is one (sample, loss) pair: its input, label, start and (APGD-T) target class. Rows never
interact (the model in eval mode), so each row follows exactly the trajectory it would follow
alone. The algorithm as their code (``fra31/auto-attack``) and torchattacks 3.5.1 run it: the
first step has size 2·eps and no momentum, every later step is
``x + 0.75 (z - x) + 0.25 (x - x_prev)`` with ``z`` the projected (sign or L2-normalized)
gradient step; at checkpoints after ``0.22 n_iter`` iterations, then ever closer (the distance
shrinks by ``0.03 n_iter`` down to ``0.06 n_iter``), a row's step size is halved and it restarts
from its best point when the loss went up in at most ``rho`` (0.75) of the steps since the last
checkpoint, or when the previous checkpoint did not halve and the best loss has not improved
since. Where the reference code and the paper's text differ: :mod:`measures.apgd`'s docstring.

With ``early_exit`` a row leaves the working set at the first iterate that fools the model, and
with ``groups`` so do the other rows of its group (APGD-T's other target classes of the same
sample: the sample is broken, nothing more is learnt from them). Every row still in the set goes
on as in the full batch (the checkpoint schedule depends on the iteration only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MOMENTUM = 0.75  # the paper's alpha: weight of the new step (the first step has none)
DIVISION_EPS = 1e-12  # the reference code's guard in normalizations and the DLR denominator


@dataclass
class APGDRun:
    """The result of one APGD run (per row).

    ``x_best``/``loss_best``: the point of highest loss and its loss (the paper's output);
    ``correct_at_best``: whether the model classifies ``x_best`` correctly; ``robust``: correct at
    the start and at every iterate (AutoAttack's count); ``x_fooled``: the last iterate that fooled
    the model (the start where none did; torchattacks' ``x_best_adv``). With ``early_exit`` a row
    leaves at the first iterate that fools it: its ``x_fooled`` is that iterate and its
    ``x_best``/``loss_best`` are those of that moment; a row that leaves with its group (another
    row of it was fooled) keeps ``robust`` True and the ``x_best``/``loss_best`` of that moment.
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


def per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample vector shaped to broadcast over ``x``'s sample dimensions."""
    return t.view(-1, *([1] * (x.dim() - 1)))


def l2(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, keepdim (summed over dims 1.. as the reference code sums)."""
    return (t**2).sum(dim=tuple(range(1, t.dim())), keepdim=True).sqrt()


def _project(x_new: torch.Tensor, x: torch.Tensor, eps: float, norm: str, guard: bool) -> torch.Tensor:
    """Onto the eps-ball around ``x`` and [0, 1], as the reference writes it (``guard``: the
    ``+ 1e-12`` torchattacks adds to the L2 norm in the second projection of a step)."""
    if norm == "linf":
        return torch.clamp(torch.min(torch.max(x_new, x - eps), x + eps), 0.0, 1.0)
    d = x_new - x
    size = l2(d)
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
        z = _project(x_adv + step_size * grad / (l2(grad) + DIVISION_EPS), x, eps, norm, guard=False)
    return _project(x_adv + (z - x_adv) * a + momentum * (1 - a), x, eps, norm, guard=True)


def _too_few_increases(loss_steps: torch.Tensor, i: int, k: int, rho: float) -> torch.Tensor:
    """Rows whose loss went up in at most ``rho · k`` of the last ``k`` steps (checkpoint at ``i``).

    ``loss_steps[j]``: the loss after step ``j``. Row ``-1`` wraps to the last row, as in the
    reference code (at the first checkpoint that row is still 0).
    """
    ups = torch.zeros(loss_steps.shape[1], dtype=torch.int64, device=loss_steps.device)
    for c in range(k):
        ups += loss_steps[i - c] > loss_steps[i - c - 1]
    return ups <= k * rho


def _evaluate(model: nn.Module, x_adv: torch.Tensor, loss_of, need_grad: bool, max_rows: int | None):
    """(logits, loss, input gradient or None) of the rows, the model called on at most ``max_rows``
    rows at a time (None: all at once). Rows are independent, so the split changes rounding only."""
    n = len(x_adv)
    size = n if max_rows is None else max(1, min(max_rows, n))
    logits, losses, grads = [], [], []
    for s in range(0, n, size):
        part = x_adv if size == n else x_adv[s : s + size].clone()
        with torch.set_grad_enabled(need_grad):
            part.requires_grad_(need_grad)
            z = model(part)
            loss = loss_of(z, slice(s, s + size))
        if need_grad:
            grads.append(torch.autograd.grad(loss.sum(), part)[0])
        part.requires_grad_(False)
        logits.append(z.detach())
        losses.append(loss.detach())
    if len(logits) == 1:
        return logits[0], losses[0], grads[0] if need_grad else None
    return torch.cat(logits), torch.cat(losses), torch.cat(grads) if need_grad else None


def run_apgd(
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
    groups: torch.Tensor | None = None,
    max_rows: int | None = None,
    work=None,
) -> APGDRun:
    """One APGD run on the rows ``(x, y, start[, y_target])`` (no state handling: the callers do it).

    Cross-entropy, or the targeted DLR loss towards ``y_target``. ``early_exit``: a row fooled at
    some iterate has its outputs written and leaves the working set, and with it every row of the
    same ``groups`` value (None: each row its own group). ``max_rows``: rows per model call (None:
    all). ``work``: an ``AttackWork`` or None (per row: a gradient for each row that goes on, a
    forward for each row evaluated at its last point).
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

    def loss_of(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        if y_target is None:
            return F.cross_entropy(logits, y[rows], reduction="none")
        return dlr_targeted_loss(logits, y[rows], y_target[rows])

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
        logits, loss, grad = _evaluate(model, x_adv, loss_of, not last, max_rows)
        x_adv = x_adv.detach()
        correct = logits.argmax(dim=1) == y
        fooled = ~correct
        leave = fooled if groups is None or not early_exit else torch.isin(groups, groups[fooled])
        if work is not None:
            stays = len(x) if not early_exit else len(x) - int(leave.sum())
            work.gradients += 0 if last else stays
            work.forwards += len(x) if last else len(x) - stays
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
        if early_exit and not last and bool(leave.any()):
            _write_best(out, state, active, leave)
            keep = ~leave
            active, x, y, x_adv = active[keep], x[keep], y[keep], x_adv[keep]
            y_target = None if y_target is None else y_target[keep]
            groups = None if groups is None else groups[keep]
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
