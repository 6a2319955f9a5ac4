"""The worst-case gap: how far the epoch-end PGD accuracy is above AutoAttack's, per eps.

Not a trend over a hyperparameter but a check of the robust accuracy itself: a large gap says the
PGD numbers of the other verdicts overstate robustness.
"""

from __future__ import annotations

import math

import pandas as pd

from reporting.runs import adv_columns, converged


def worst_case_gap(df: pd.DataFrame) -> pd.DataFrame | None:
    """Per eps, how far the epoch-end PGD accuracy is above the worst case (``autoattack_linf``), in
    points over the completed runs that have both (from converged measurements): mean, max and the
    run of the max. None when the runs have no ``adv/autoattack_linf/eps*`` (or no PGD at the same eps)."""
    attacks = adv_columns(df)
    pgd = dict(attacks.get("pgd_linf", []))
    rows = []
    for eps, col in attacks.get("autoattack_linf", []):
        pcol = next((c for e, c in pgd.items() if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12)), None)
        if pcol is None:
            continue
        both = df[df["status"] == "completed"].dropna(subset=[col, pcol])
        both = both[converged(both, col) & converged(both, pcol)]
        if not len(both):
            continue
        gap = 100 * (both[pcol] - both[col])
        rows.append(
            {
                "eps": eps,
                "n_runs": len(both),
                "pgd_mean": both[pcol].mean(),
                "worst_case_mean": both[col].mean(),
                "gap_mean_points": gap.mean(),
                "gap_max_points": gap.max(),
                "gap_max_job": both.loc[gap.idxmax(), "job"],
            }
        )
    return pd.DataFrame(rows) if rows else None
