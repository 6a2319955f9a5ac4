"""One sweep directory into one report folder: tables, verdicts, figures and the notes that say
what is missing, doubtful or left out (see ``report.py`` for the list of files)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lifecycle.record import FINISHED
from reporting import figures, landscape
from reporting.runs import NOT_AT_TARGET, at_target, grid_notes, load_runs, num, tidy, unconverged_table
from reporting.verdicts import Thresholds, verdicts, worst_case_gap, write_verdicts


def report(
    sweep_dir: Path,
    out: Path | None = None,
    thresholds: Thresholds | None = None,
    contour_runs: list[str] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Write the CSVs, figures and verdicts; return the table and the readable notes.

    Runs with landscape or density arrays saved by ``measure.py`` also get their figures
    (:mod:`reporting.landscape`; ``contour_runs``: the runs drawn as contours, see
    :func:`~reporting.landscape.figure_contours`)."""
    th = thresholds or Thresholds()
    out = out or sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs, notes = load_runs(sweep_dir, skip=out)
    notes += grid_notes(sweep_dir, runs, skip=out)
    for r in runs:
        if r.get("status") not in FINISHED:
            notes.append(f"{r['job']}: {r.get('status')}" + (f" ({r['error']})" if r.get("error") else ""))
        elif r.get("status") == "diverged":
            notes.append(f"{r['job']}: diverged (excluded from the figures)")
    df = tidy(runs, eos_threshold=th.eos)
    df.to_csv(out / "runs.csv", index=False)
    good = df[df["status"] == "completed"] if len(df) else df
    notes += convergence_notes(good, th)
    short = good[~at_target(good)] if len(good) else good
    short.reindex(columns=NOT_AT_TARGET).to_csv(out / "not_at_target.csv", index=False)
    unconv = unconverged_table(runs, df)
    unconv.to_csv(out / "unconverged.csv", index=False)
    table, verdict_notes = verdicts(df, th)
    gap = worst_case_gap(good) if len(good) else None
    if gap is not None:
        gap.to_csv(out / "worst_case_gap.csv", index=False)
    else:
        verdict_notes.append("worst-case gap skipped: the runs have no adv/autoattack_linf/eps* keys")
    if len(unconv):
        verdict_notes.append(unconverged_note(unconv))
    write_verdicts(df, table, gap, verdict_notes, th, out)
    notes += verdict_notes
    if len(good):
        figures.draw_all(good, runs, out)
        landscape.draw_sweep(good, runs, out, contour_runs)
    return df, notes


def unconverged_note(unconv: pd.DataFrame) -> str:
    """What ``unconverged.csv`` lists, in one line: the measurements left out, run by run."""
    n = unconv["job"].nunique()
    return (
        f"{n} completed run{'s' if n != 1 else ''} with a final measurement that did not converge "
        "(its values drawn hollow, left out of the means and verdicts; unconverged.csv): "
        + "; ".join(
            f"{r.job} ({r.prefix}, relative error {r.rel_error:.3g})" for r in unconv.itertuples(index=False)
        )
    )


def convergence_notes(good: pd.DataFrame, th: Thresholds) -> list[str]:
    """Notes on the completed runs: short of their target, without one, limited by the lr."""
    if not len(good):
        return []
    notes = []
    short = good[good["reached_target"].eq(False)]
    if len(short):
        notes.append(
            f"{len(short)} completed run{'s' if len(short) != 1 else ''} stopped short of the training "
            "target (hollow markers; left out of the means and verdicts; not_at_target.csv): "
            + "; ".join(
                f"{r.job} ({r.stop_reason}, train acc {num(getattr(r, 'train_acc', float('nan'))):.3g})"
                for r in short.rename(columns={"train/acc": "train_acc"}).itertuples()
            )
        )
    free = good[good["reached_target"].isna()]
    if len(free):
        notes.append(
            f"{len(free)} completed run{'s' if len(free) != 1 else ''} had no training target: compared "
            "where they stopped (reached_target empty): " + "; ".join(sorted(free["job"]))
        )
    lim = good[good["lr_limited"]]
    if len(lim):
        notes.append(
            f"{len(lim)} run{'s' if len(lim) != 1 else ''} limited by the learning rate, not the batch "
            f"size (eos_ratio = λ1·lr/(2(1+β)) >= {th.eos:g}): "
            + "; ".join(f"{r.job} ({r.eos_ratio:.2f})" for r in lim.itertuples())
        )
    return notes
