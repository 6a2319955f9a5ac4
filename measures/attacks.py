"""Attack specs, adversarial training examples and robust-accuracy counting, in plain torch.

Pure torch (no Lightning): the attack callback and adversarial training import from here. The
attacks themselves are in :mod:`measures.pgd` (FGSM, PGD L∞/L2) and :mod:`measures.apgd`
(AutoAttack's APGD-CE and APGD-T, ``AttackSpec("apgdce" | "apgdt", ...)``); the sanity checks on
the resulting counts are in :mod:`measures.checks`, the attacks' names in :mod:`measures.names`.

Conventions (of every attack in :mod:`measures`)
------------------------------------------------
* Inputs live in [0, 1] pixel space and stay there (every iterate is clamped); the model
  takes such inputs and returns logits; the attack loss is cross-entropy.
* Gradients are taken with respect to the input only (``torch.autograd.grad``), never with
  ``.backward()``. After any public function returns, the model's train/eval flags, the
  parameters' ``.grad``, every buffer (BatchNorm running statistics) and the global RNG
  state are exactly as before (``preserved_module_state``).
* Nothing here changes the model's mode: the caller decides. torchattacks switches the
  model to eval for the attack; the robustness callback calls these functions on a model in
  eval mode, and adversarial training decides for itself.
* The functions work when called under ``torch.no_grad()`` or ``torch.inference_mode()``
  (inputs created in inference mode are cloned outside it).
* Random starts never use the global RNG: ``fgsm``/``pgd`` draw from the ``generator``
  given (a fixed-seed one when ``None``); ``robust_accuracy_counts`` derives each sample's
  start from (seed, the sample's index in the evaluation set) with a counter-based hash, so
  its counts do not depend on batching or on how samples are split across ranks
  (:mod:`measures.noise`).
* Robust accuracy over an eps grid is nested by default: a sample broken at some eps counts as
  broken at every larger eps of the same attack, and the larger eps attack only the samples
  still robust (``robust_accuracy_counts(nested=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from measures.apgd import apgd_robust
from measures.distributed import ProcessGroup, all_reduce_sum
from measures.module_state import autograd_input, gradients_enabled, preserved_module_state
from measures.names import APGD_ATTACKS, ATTACKS, NORMS, TRAINING_ATTACKS
from measures.pgd import fgsm, input_gradient, per_sample_unit_start, pgd, pgd_fooled_at_any_iterate, pgd_from

DEFAULT_STEPS = {"fgsm": 10, "pgd": 10, "apgdce": 100, "apgdt": 100}


# --------------------------------------------------------------------------- attack specs


@dataclass(frozen=True)
class AttackSpec:
    """One attack configuration of an evaluation grid.

    ``step_size=None`` means 2.5 · eps / steps (Madry et al.). FGSM is L∞ only and has no
    steps or random start. ``tag`` is appended to ``key`` to tell apart two specs that would
    otherwise share a key (e.g. PGD-10 and PGD-40 at the same eps).

    ``apgdce``/``apgdt`` (:mod:`measures.apgd`): ``steps`` is APGD's ``n_iter`` (``None``: 100,
    the paper's; 10 for FGSM and PGD), the step size is APGD's own (``step_size`` must be
    ``None``), and APGD-T attacks ``n_target_classes`` target classes (9: AutoAttack's).
    """

    name: str
    eps: float
    norm: str = "linf"
    steps: int | None = None
    step_size: float | None = None
    random_start: bool = True
    tag: str = ""
    n_target_classes: int = 9

    def __post_init__(self):
        if self.name not in ATTACKS:
            raise ValueError(f"attack name must be one of {ATTACKS}, got {self.name!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.name == "fgsm" and self.norm != "linf":
            raise ValueError(f"fgsm is an L-inf attack, got norm={self.norm!r}")
        if self.steps is None:  # the attack's own default (frozen dataclass: set once, here)
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.name])
        if self.name in APGD_ATTACKS:
            if self.steps < 1 or self.step_size is not None:
                raise ValueError(
                    f"{self.name}: steps >= 1 and step_size None (APGD sets its own), "
                    f"got steps={self.steps!r}, step_size={self.step_size!r}"
                )
            if int(self.n_target_classes) != self.n_target_classes or self.n_target_classes < 1:
                raise ValueError(f"n_target_classes must be an integer >= 1, got {self.n_target_classes!r}")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"step_size must be > 0 or None, got {self.step_size!r}")

    @property
    def key(self) -> str:
        """Readable name, e.g. ``"pgd_linf_eps0.1"`` or ``"fgsm_linf_eps0.0314"``."""
        return f"{self.name}_{self.norm}_eps{self.eps:.4g}" + (f"_{self.tag}" if self.tag else "")

    @property
    def alpha(self) -> float:
        """The PGD step size actually used."""
        if self.step_size is not None:
            return float(self.step_size)
        return 2.5 * self.eps / max(self.steps, 1)


# --------------------------------------------------------------------------- adversarial training


def adversarial_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: AttackSpec,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial versions of ``(x, y)`` for adversarial training, as ``spec`` says.

    The caller chooses the model's mode (train-mode BatchNorm normalizes with the batch's
    statistics; its running statistics are left untouched by the attack). Pass a generator
    owned by the training loop so that each call gets fresh random starts.
    """
    if spec.name not in TRAINING_ATTACKS:
        raise ValueError(f"{spec.name} is an evaluation attack, not one for adversarial training")
    if spec.eps == 0:
        return x.detach().clone()
    if spec.name == "fgsm":
        return fgsm(model, x, y, spec.eps)
    return pgd(
        model, x, y, spec.eps, spec.alpha, spec.steps, norm=spec.norm,
        random_start=spec.random_start, generator=generator,
    )  # fmt: skip


# --------------------------------------------------------------------------- robust accuracy


@dataclass
class AttackWork:
    """The model work of a robust-accuracy evaluation, counted per sample.

    ``gradients``: input gradients used (one per attacked sample and attack step: samples x
    steps), each a forward and a backward pass; ``forwards``: the other passes through the model
    (clean predictions, FGSM's check, the iterate at which a PGD sample is fooled or its last one).
    Both are sums over samples, so they do not depend on batching or on the split across ranks.
    (With early exit, a batch's backward pass also runs over the samples fooled at that iterate,
    with a zero gradient: the compute is between ``gradients`` and ``passes`` backward passes.)
    """

    gradients: int = 0
    forwards: int = 0

    @property
    def passes(self) -> int:
        """All passes through the model (a backward pass is not counted apart)."""
        return self.gradients + self.forwards


ProgressFn = Callable[[int, "int | None", str], None]


def attack_family(spec: AttackSpec) -> tuple:
    """What ``spec`` shares with the other eps of its family: everything but eps."""
    return (
        spec.name, spec.norm, spec.steps, spec.step_size, spec.random_start, spec.tag,
        spec.n_target_classes if spec.name == "apgdt" else None,
    )  # fmt: skip


def worst_case_key(norm: str, eps: float) -> str:
    """Key of the worst case over the FGSM/PGD families of one norm, e.g. ``"worst_linf_eps0.1"``."""
    return f"worst_{norm}_eps{eps:.4g}"


def autoattack_key(norm: str, eps: float) -> str:
    """Key of the worst case over every attack of one norm, APGD included: ``"autoattack_linf_eps0.1"``."""
    return f"autoattack_{norm}_eps{eps:.4g}"


def worst_case_keys(attacks: Sequence[AttackSpec]) -> dict[str, tuple[str, float]]:
    """``{key: (norm, eps)}`` of the worst case over FGSM and PGD: for every norm with two or more of
    their families. APGD attacks are left out, so that it means the same with or without them."""
    fast = [s for s in attacks if s.name not in APGD_ATTACKS]
    families: dict[str, set] = {}
    for spec in fast:
        families.setdefault(spec.norm, set()).add(attack_family(spec))
    return {
        worst_case_key(norm, eps): (norm, eps)
        for norm in NORMS
        if len(families.get(norm, ())) > 1
        for eps in sorted({s.eps for s in fast if s.norm == norm})
    }


def autoattack_keys(attacks: Sequence[AttackSpec]) -> dict[str, tuple[str, float]]:
    """``{key: (norm, eps)}`` of the worst case over every attack (FGSM, PGD, APGD-CE, APGD-T): for
    every norm attacked by an APGD attack, at every eps of that norm."""
    norms = {s.norm for s in attacks if s.name in APGD_ATTACKS}
    return {
        autoattack_key(norm, eps): (norm, eps)
        for norm in NORMS
        if norm in norms
        for eps in sorted({s.eps for s in attacks if s.norm == norm})
    }


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    p = next(model.parameters(), None)
    return fallback if p is None else p.device


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, work: AttackWork) -> torch.Tensor:
    work.forwards += len(x)
    return model(x).argmax(dim=1)


def _family_masks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    specs: list[AttackSpec],
    clean_ok: torch.Tensor,
    base: torch.Tensor,
    unit: torch.Tensor | None,
    idx: torch.Tensor,
    *,
    seed: int,
    early_exit: bool,
    nested: bool,
    work: AttackWork,
    on_spec,
) -> list[torch.Tensor]:
    """Robust masks of one attack family (``specs``: the same attack at increasing eps) on one batch.

    ``base``: the samples attacked at all (clean-correct ones unless ``early_exit=False`` and
    ``nested=False``). Nested: each eps attacks only the samples still robust at every smaller eps.
    """
    fgsm_sign = None
    if specs[0].name == "fgsm" and any(s.eps > 0 for s in specs):
        # FGSM's step is eps · sign(∇x loss at x): one gradient serves every eps.
        fgsm_sign = torch.zeros_like(x)
        rows = base.nonzero().squeeze(1)
        if len(rows):
            work.gradients += len(rows)
            fgsm_sign[rows] = input_gradient(model, x[rows], y[rows]).sign()
    out, alive = [], base
    for spec in specs:
        if spec.eps == 0:
            ok = clean_ok.clone()
        else:
            rows = (alive if nested else base).nonzero().squeeze(1)
            ok = torch.zeros_like(clean_ok)
            if len(rows):
                ok[rows] = _robust_rows(
                    model, x[rows], y[rows], spec, fgsm_sign, unit, rows, idx[rows], seed, early_exit, work
                )
        if nested:
            ok &= alive
            alive = ok
        out.append(ok)
        on_spec(spec, ok)
    return out


def _robust_rows(model, xs, ys, spec, fgsm_sign, unit, rows, idxs, seed, early_exit, work) -> torch.Tensor:
    """One attack at one eps on the samples ``rows`` of the batch (indices ``idxs``): which stay correct."""
    if spec.name in APGD_ATTACKS:
        return apgd_robust(
            model, xs, ys, idxs, spec.eps, targeted=spec.name == "apgdt", norm=spec.norm, n_iter=spec.steps,
            n_target_classes=spec.n_target_classes, seed=seed, random_start=spec.random_start,
            early_exit=early_exit, work=work,
        )  # fmt: skip
    if spec.name == "fgsm":
        adv = (xs + spec.eps * fgsm_sign[rows]).clamp_(0, 1)
        return _predict(model, adv, work) == ys
    start = (xs + spec.eps * unit[rows]).clamp_(0, 1) if spec.random_start else xs
    if early_exit:
        return ~pgd_fooled_at_any_iterate(
            model, xs, ys, start, spec.eps, spec.alpha, spec.steps, spec.norm, work
        )
    work.gradients += len(xs) * spec.steps
    adv = pgd_from(model, xs, ys, start, spec.eps, spec.alpha, spec.steps, spec.norm)
    return _predict(model, adv, work) == ys


def _batch_masks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    attacks: Sequence[AttackSpec],
    *,
    seed: int,
    early_exit: bool,
    nested: bool,
    work: AttackWork,
    on_spec=lambda spec, ok: None,
) -> dict[str, torch.Tensor]:
    """Robust masks of one batch (the model's state is handled by the callers)."""
    clean_ok = _predict(model, x, work) == y
    # Nested: clean is eps 0, so a sample wrong at clean is broken at every eps.
    base = clean_ok if (early_exit or nested) else torch.ones_like(clean_ok)
    masks = {"clean": clean_ok}
    families: dict[tuple, list[AttackSpec]] = {}
    for spec in attacks:
        families.setdefault(attack_family(spec), []).append(spec)
    units: dict[str, torch.Tensor] = {}
    for specs in families.values():
        specs = sorted(specs, key=lambda s: s.eps)
        norm = specs[0].norm
        if specs[0].name == "pgd" and specs[0].random_start and norm not in units:
            units[norm] = per_sample_unit_start(x, idx, seed, norm)
        family = _family_masks(
            model, x, y, specs, clean_ok, base, units.get(norm), idx,
            seed=seed, early_exit=early_exit, nested=nested, work=work, on_spec=on_spec,
        )  # fmt: skip
        masks.update(zip((s.key for s in specs), family, strict=True))
    # Worst cases: robust to every attack of the norm (FGSM/PGD, or all) at every eps <= eps (nested).
    fast = [s for s in attacks if s.name not in APGD_ATTACKS]
    for combined, among in ((worst_case_keys(attacks), fast), (autoattack_keys(attacks), attacks)):
        for key, (norm, eps) in combined.items():
            same = [s for s in among if s.norm == norm and (s.eps <= eps if nested else s.eps == eps)]
            masks[key] = torch.stack([masks[s.key] for s in same]).all(dim=0)
    return masks


def _check_keys(attacks: Sequence[AttackSpec]) -> None:
    keys = [spec.key for spec in attacks]
    if len(set(keys)) != len(keys) or "clean" in keys:
        raise ValueError(f"attack keys must be unique and not 'clean', got {keys}; use AttackSpec.tag")


def robust_masks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    attacks: Sequence[AttackSpec],
    *,
    seed: int = 0,
    early_exit: bool = True,
    nested: bool = True,
    work: AttackWork | None = None,
) -> dict[str, torch.Tensor]:
    """Which samples of ``(x, y)`` are robust: ``{"clean": mask, spec.key: mask, ...}``, on this process.

    The per-sample form of :func:`robust_accuracy_counts` (same arguments and keys; the counts
    are these masks summed over batches and ranks); ``work`` (optional) is increased by this
    call's work.
    """
    _check_keys(attacks)
    work = AttackWork() if work is None else work
    device = _model_device(model, x.device)
    with gradients_enabled(), preserved_module_state(model):
        x, y = autograd_input(x.to(device)), autograd_input(y.to(device))
        return _batch_masks(
            model, x, y, idx.to(device), attacks, seed=seed, early_exit=early_exit, nested=nested, work=work
        )


def robust_accuracy_counts(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    attacks: Sequence[AttackSpec],
    *,
    seed: int = 0,
    early_exit: bool = True,
    nested: bool = True,
    process_group: ProcessGroup = None,
    progress: ProgressFn | None = None,
    work: AttackWork | None = None,
) -> dict[str, tuple[int, int]]:
    """Correct/total counts at clean and under every attack, over all ``batches`` in one pass.

    ``batches`` yields ``(x, y, idx)``, ``idx`` the samples' indices in the evaluation set:
    each sample's random start is a function of ``(seed, idx)`` only, so the counts do not
    depend on batching or on the split across ranks. The counts are summed over the ranks of
    ``process_group`` (see :mod:`measures.distributed`; one all-reduce, run by every rank even
    with no batches), and every rank returns the same numbers. Returns ``{"clean": (correct, total),
    spec.key: (correct, total), ...}``, for every norm attacked by two or more FGSM/PGD families
    (e.g. FGSM and PGD L∞) ``worst_case_key(norm, eps)``: robust to all of them, and for every norm
    attacked by APGD-CE or APGD-T ``autoattack_key(norm, eps)``: robust to every attack of that
    norm, APGD included (the worst case; ``worst_...`` leaves APGD out, so it means the same with or
    without APGD). An attack with eps = 0 is reported as clean.

    ``early_exit=True``: a sample counts as robust only if it is correct at clean and at
    every attack iterate (as AutoAttack counts); samples misclassified at clean are not
    attacked, a PGD or APGD sample stops iterating once an iterate fools the model, and APGD-T
    attacks it for the next target class only while it is robust.
    ``early_exit=False``: every sample is attacked for all steps and judged on the final
    iterate only (torchattacks' / the usual definition; APGD: on each run's best-loss point, the
    paper's output, for every target class). In eval mode, early-exit counts are
    <= the full counts for every attack (a sample never fooled on the way is correct at the
    end), typically equal or slightly lower, and cheaper.

    ``nested=True`` (nested eps): a sample broken at some eps is broken at every larger eps of the
    same attack family (its adversarial example lies in the larger ball too), and one wrong at
    clean (eps 0) at every eps. The eps of a family are attacked in increasing order, each only on
    the samples still robust at all smaller eps: a sample's "broken at eps" is the union of what
    ``nested=False`` (each eps on its own) finds at every eps <= it, so every count is <= the
    per-eps count, robust accuracy never rises with eps, and the work shrinks as eps grows. The
    worst case over families is then robust to every attack of the norm at every eps <= eps
    (``nested=False``: at that eps). Nesting hides the per-eps signal of gradient masking
    (accuracy rising with eps): check with ``nested=False``.

    FGSM's step at every eps comes from one input gradient (``sign(∇x loss)`` at the clean input).
    Each eps is one batch of the samples it attacks: stacking the samples of all eps of a family
    into one batch gave the same counts but took ~1.5x the time on CPU (1 thread, LeNet, 500 MNIST
    digits; ``benchmarks/adversarial.py --part nested`` at commit c718f34, which had ``stack_eps``).

    ``progress(done, total, message)`` (optional, on every rank) is called after each attack and
    eps of each batch (``total`` None when ``batches`` has no length). ``work`` (optional) is
    increased by the work of all ranks (:class:`AttackWork`).

    Call with the model in eval mode (the callback does): in train mode BatchNorm couples the
    samples of a batch, and neither batching invariance nor the bounds above hold.
    """
    _check_keys(attacks)
    keys = ["clean", *(spec.key for spec in attacks), *worst_case_keys(attacks), *autoattack_keys(attacks)]
    device = _model_device(model, torch.device("cpu"))
    total = len(batches) * len(attacks) if hasattr(batches, "__len__") else None
    done = 0
    local = AttackWork()
    with gradients_enabled(), preserved_module_state(model):
        counts = torch.zeros(len(keys) + 1, 2, dtype=torch.int64, device=device)
        for b, (x, y, idx) in enumerate(batches):
            if len(x) == 0:
                done += len(attacks)
                continue
            x, y = autograd_input(x.to(device)), autograd_input(y.to(device))
            n = len(x)

            def on_spec(spec: AttackSpec, ok: torch.Tensor, n=n, b=b) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(done, total, f"batch {b + 1}: {spec.key} {int(ok.sum())}/{n} robust")

            masks = _batch_masks(
                model, x, y, idx.to(device), attacks, seed=seed, early_exit=early_exit, nested=nested,
                work=local, on_spec=on_spec,
            )  # fmt: skip
            counts[:-1, 1] += len(x)
            counts[:-1, 0] += torch.stack([masks[k].sum() for k in keys])
        counts[-1, 0], counts[-1, 1] = local.gradients, local.forwards
        all_reduce_sum(counts, process_group)
    values = counts.cpu().tolist()
    if work is not None:
        work.gradients += values[-1][0]
        work.forwards += values[-1][1]
    return {key: (c, n) for key, (c, n) in zip(keys, values[:-1], strict=True)}
