"""Sanity checks on robust-accuracy counts: signs of gradient masking or a broken evaluation.

Kept apart from the attacks (as AutoAttack keeps ``checks.py``): these read the counts of
:func:`measures.attacks.robust_accuracy_counts` and never run a model.
"""

from __future__ import annotations

from collections.abc import Sequence

from measures.attacks import AttackSpec


def gradient_masking_warnings(
    counts: dict[str, tuple[int, int]], attacks: Sequence[AttackSpec], *, tolerance: float = 0.0
) -> list[str]:
    """Signs of gradient masking or a broken evaluation (Carlini et al. 2019 checklist).

    Flags, in accuracy units beyond ``tolerance``: robust accuracy that rises with eps within
    one attack family (same name, norm, steps, step rule, random start); PGD more accurate
    than FGSM at the same L∞ eps; an eps = 0 attack that differs from clean accuracy.
    Returns readable messages (empty when nothing is suspicious). Nested-eps counts
    (``robust_accuracy_counts(nested=True)``) never rise with eps, so only per-eps counts
    (``nested=False``) can show the first sign.
    """

    def acc(key: str) -> float:
        c, n = counts[key]
        return c / n if n else float("nan")

    warnings: list[str] = []
    clean = acc("clean")
    families: dict[tuple, list[AttackSpec]] = {}
    for spec in attacks:
        if spec.eps == 0 and abs(acc(spec.key) - clean) > tolerance:
            warnings.append(
                f"{spec.key}: accuracy {acc(spec.key):.4f} at eps=0 differs from clean {clean:.4f}"
            )
        rule = "auto" if spec.step_size is None else "fixed"
        family = (spec.name, spec.norm, spec.steps, rule, spec.random_start, spec.tag)
        families.setdefault(family, []).append(spec)
    for specs in families.values():
        specs = sorted(specs, key=lambda s: s.eps)
        for lo, hi in zip(specs, specs[1:], strict=False):
            if acc(hi.key) > acc(lo.key) + tolerance:
                warnings.append(
                    f"{hi.key}: accuracy {acc(hi.key):.4f} is higher than at smaller eps "
                    f"({lo.key}: {acc(lo.key):.4f}); robust accuracy should not rise with eps"
                )
    fgsm_by_eps = {s.eps: s for s in attacks if s.name == "fgsm"}
    for spec in attacks:
        f = fgsm_by_eps.get(spec.eps)
        if spec.name == "pgd" and spec.norm == "linf" and f is not None:
            if acc(spec.key) > acc(f.key) + tolerance:
                warnings.append(
                    f"{spec.key}: PGD accuracy {acc(spec.key):.4f} is higher than FGSM's "
                    f"{acc(f.key):.4f} at the same eps; PGD should be at least as strong"
                )
    return warnings
