"""The report as one W&B run of job type ``report``: the runs table, the figures as native W&B
line charts built from tables (interactive, unlike the PNGs), and the PNGs as images.

``wandb`` is imported inside :func:`log_to_wandb` only, so a report without ``--wandb`` never
loads it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from lifecycle.wandb_env import wandb_mode
from reporting.figures import mean_std, series
from reporting.runs import adv_columns, counted, load_runs, num

CHARTS = (  # (key, column, title): the figures' panels, as means over seeds vs batch size
    ("lambda_1_vs_batch", "hessian/lambda_1", "top Hessian eigenvalue λ1 vs batch size, and 2(1+β)/lr"),
    ("train_loss_vs_batch", "train/loss", "final train loss vs batch size"),
    ("test_acc_vs_batch", "test/acc", "test accuracy vs batch size"),
    ("gen_gap_vs_batch", "gen_gap/acc", "generalization gap vs batch size"),
)


def _field(col: str) -> str:
    """A column name W&B's chart specs read as one field (no '/' or '.')."""
    return re.sub(r"[^A-Za-z0-9_]", "_", col)


def chart_tables(df: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, str, str, str]]:
    """The figures' data as long tables for W&B's line charts: ``{key: (table, x, y, title)}``.

    One row per (series, x): the mean over the seeds whose value counts (``std`` beside it), a series
    per lr rule / momentum / training as in the PNGs; λ1 with its stability threshold as a series of
    its own, robust accuracy vs eps per attack and batch size.
    """
    out = {}
    for key, col, title in CHARTS:
        if col not in df or df[col].isna().all():
            continue
        y, rows = _field(col), []
        for label, part in series(df):
            s = mean_std(part[counted(part, col)].dropna(subset=[col]), col)
            rows += [
                {"batch_size": b, y: m, "std": sd, "series": label} for b, m, sd in s.itertuples(index=False)
            ]
            if col == "hessian/lambda_1" and "stability_threshold" in part:
                t = part.groupby("batch_size")["stability_threshold"].mean()
                rows += [
                    {"batch_size": b, y: v, "std": 0.0, "series": f"2(1+β)/lr, {label}"} for b, v in t.items()
                ]
        out[key] = (pd.DataFrame(rows), "batch_size", y, title)
    for attack, cols in sorted(adv_columns(df).items()):
        rows = []
        for label, part in series(df):
            for b, sub in part[counted(part, cols[0][1])].groupby("batch_size"):
                rows += [
                    {
                        "eps": e,
                        "robust_acc": sub[c].mean(),
                        "std": num(sub[c].std()),
                        "series": f"B={b}, {label}",
                    }
                    for e, c in cols
                ]
        out[f"robust_vs_eps_{attack}"] = (
            pd.DataFrame(rows),
            "eps",
            "robust_acc",
            f"robust accuracy vs eps, {attack}",
        )
    return out


def log_to_wandb(sweep_dir: Path, out: Path, df: pd.DataFrame) -> None:
    """One W&B run of job type ``report``: the runs table (one row per job), the figures as native
    W&B charts (``charts/*``, built from tables of the completed runs, so they are interactive) and
    as images (``figures/*``). Offline without credentials (:func:`lifecycle.wandb_env.wandb_mode`)."""
    import wandb

    runs, _ = load_runs(sweep_dir, skip=out)
    config = runs[0].get("config") or {} if runs else {}
    group = config.get("experiment_name", sweep_dir.name) if runs else sweep_dir.name
    run = wandb.init(
        project="sgd-curvature",
        group=group,
        tags=[str(group)],
        job_type="report",
        name=f"report-{sweep_dir.name}",
        dir=str(out),
        mode=wandb_mode(),
    )
    logged = {"runs": wandb.Table(dataframe=df)}
    good = df[df["status"] == "completed"] if len(df) else df
    if len(good):
        for key, (table, x, y, title) in chart_tables(good).items():
            logged[f"charts/{key}"] = wandb.plot.line(
                wandb.Table(dataframe=table), x, y, stroke="series", title=title
            )
        if "hessian/lambda_1" in good:
            points = pd.DataFrame({"batch_size": good["batch_size"], "lambda_1": good["hessian/lambda_1"]})
            logged["charts/lambda_1_per_run"] = wandb.plot.scatter(
                wandb.Table(dataframe=points), "batch_size", "lambda_1", title="λ1 of every run vs batch size"
            )
    run.log(logged)
    for png in sorted(out.glob("*.png")):
        run.log({f"figures/{png.stem}": wandb.Image(str(png))})
    run.finish()
