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
  (:func:`measures.attacks.robust_accuracy_counts` with ``AttackSpec("apgdce" | "apgdt", ...)``),
  APGD-T's target classes as rows of one batch (:func:`apgd_rows`); the run itself is
  :func:`measures.apgd_run.run_apgd`.

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

import torch
from torch import nn

from measures.apgd_run import DIVISION_EPS, APGDRun, l2, per_sample, run_apgd
from measures.module_state import autograd_input, gradients_enabled, preserved_module_state
from measures.names import NORMS
from measures.noise import generator_start, sample_normal, sample_uniform

_START_STREAM = 16  # noise streams of APGD's per-sample starts: 16 + 2·run (+1); PGD uses 0-3


def _unit_direction(t: torch.Tensor, norm: str) -> torch.Tensor:
    """``t`` scaled to unit L∞ (``t / max |t|``) or unit L2 norm, per sample: the start direction."""
    if norm == "linf":
        return t / per_sample(t.flatten(1).abs().amax(dim=1), t)
    return t / (l2(t) + DIVISION_EPS)


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
        return run_apgd(
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
    run = run_apgd(
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
    max_rows: int | None = None,
    work=None,
) -> torch.Tensor:
    """Which samples withstand APGD-CE (``targeted=False``) or APGD-T: the robust-accuracy count's form.

    :func:`apgd_rows`' first output (the arguments are its own).
    """
    return apgd_rows(
        model, x, y, idx, eps, targeted=targeted, norm=norm, n_iter=n_iter, n_target_classes=n_target_classes,
        seed=seed, random_start=random_start, early_exit=early_exit, max_rows=max_rows, work=work,
    )[0]  # fmt: skip


def apgd_rows(
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
    max_rows: int | None = None,
    work=None,
) -> tuple[torch.Tensor, APGDRun]:
    """(robust per sample, every run's :class:`APGDRun`): APGD-CE's run or APGD-T's runs, all in one batch.

    APGD-T's runs, one per target class (the classes ranked 2nd, 3rd, ... by the clean logits),
    are rows of one batch: row ``j · len(x) + i`` is sample ``i``'s run towards its ``(j + 2)``-th
    class; APGD-CE has one row per sample. Each run's start is a function of (seed, the sample's
    index ``idx``, the run) only (:func:`apgd_unit_start`; ``random_start=False``: the clean
    input), so the result does not depend on batching. ``early_exit=True``: robust = correct at
    every iterate of every run (as AutoAttack counts); a sample leaves the batch, all its runs at
    once, at the first iterate that fools it in any run. The robust samples are those of running
    the target classes one after the other, each on the samples still robust (AutoAttack's way):
    both need every run of a robust sample in full, and a sample fooled by one run is broken
    either way. ``early_exit=False``: every run in full, and robust = correct at the best-loss
    point (the paper's output) of every run. ``max_rows``: rows per model call (None: ``len(x)``,
    so the caller's batch size bounds the memory whatever the number of target classes).
    Samples are not checked at clean here: the caller passes those it attacks. No state
    handling (the caller's); ``work``: an ``AttackWork`` increased by the work done.
    """
    n = len(x)
    if targeted:
        with torch.no_grad():
            logits = model(x)
        if work is not None:
            work.forwards += n
        ranked = logits.sort(dim=1)[1]
        runs = list(range(1, _n_targets(logits.shape[1], n_target_classes) + 1))
        y_target = torch.cat([ranked[:, -(run + 1)] for run in runs])
    else:
        runs, y_target = [0], None
    if random_start:
        start = torch.cat([(x + eps * apgd_unit_start(x, idx, seed, norm, run)).clamp(0, 1) for run in runs])
    else:
        start = x.repeat(len(runs), *([1] * (x.dim() - 1)))
    result = run_apgd(
        model, x.repeat(len(runs), *([1] * (x.dim() - 1))), y.repeat(len(runs)), start, eps, norm=norm,
        n_iter=n_iter, rho=0.75, y_target=y_target, early_exit=early_exit,
        groups=torch.arange(n, device=x.device).repeat(len(runs)), max_rows=n if max_rows is None else max_rows,
        work=work,
    )  # fmt: skip
    ok = result.robust if early_exit else result.correct_at_best
    return ok.view(len(runs), n).all(dim=0), result
