"""Turn a sweep directory (finished or not) into one tidy CSV and the papers' figures.

    python report.py outputs/sweeps/fixed_lr_small [--out DIR] [--wandb]

Reads every job's ``results.json`` under the sweep directory and writes, into ``DIR``
(default ``<sweep dir>/report``):

- ``runs.csv``: one row per job: status, why it stopped, hyperparameters, final train/test
  loss and accuracy, generalization gap, Hessian eigenvalues, robust accuracies, wall time;
- ``eigenvalue_vs_batch.png``: top Hessian eigenvalue vs batch size per (lr rule, momentum,
  training), with the stability threshold 2(1+β)/lr drawn, beside the final training loss;
- ``accuracy_vs_batch.png``: test accuracy and generalization gap vs batch size;
- ``robust_vs_eps.png``: robust accuracy vs eps, one line per batch size, per attack;
- ``momentum.png``: test accuracy and top eigenvalue vs batch size for each momentum,
  fixed lr vs constant ratio side by side;
- ``natural_vs_robust.png``: natural vs adversarial training across batch sizes;
- ``runs/<job>.png``: per-run curves over epochs (top eigenvalue with its 2(1+β)/lr line,
  train/test accuracy, robust accuracy).

Points are means over seeds with error bars of one standard deviation. A partial sweep is
reported as such, in notes: the grid's jobs with no result yet (the grid read from each
``multirun.yaml`` by Hydra's own override parser, values compared as values: ``1e6`` is the job
recorded as ``1000000.0``, see :mod:`lifecycle.sweep`), runs outside the grid, several records
of one job, jobs still running, failed or diverged, and each ``results.json`` that cannot be read
(skipped, never an abort). Every record under the sweep directory is read except those in the
report's own output folder.
With ``--wandb`` the table and figures are also logged as one W&B run of job type
``report`` in group and tag ``<experiment_name>`` (offline without credentials): the runs table, the
figures as native W&B line charts built from tables (``charts/*``: means over seeds vs batch
size per series, robust accuracy vs eps), and the PNGs as images.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lifecycle import sweep  # noqa: E402
from lifecycle.loggers import wandb_mode  # noqa: E402
from lifecycle.record import FINISHED, RECORD  # noqa: E402
from lightning_modules.config import effective_lr  # noqa: E402

ADV_KEY = re.compile(r"^adv/(?P<attack>[a-z]+_[a-z0-9]+)/eps(?P<eps>[0-9.e+-]+)$")


# ---- reading -------------------------------------------------------------------------------
def _under(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder.resolve())


def load_runs(sweep_dir: Path, skip: Path | None = None) -> tuple[list[dict], list[str]]:
    """Every readable record under ``sweep_dir`` (none under ``skip``, the report's own folder).

    Returns the records and a note for each record that cannot be read (truncated, not JSON).
    """
    runs, notes = [], []
    for path in sorted(sweep_dir.rglob(RECORD)):
        if _under(path, skip):
            continue
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            notes.append(f"unreadable record {path} ({e}): skipped, its job counts as having no result")
            continue
        rec["job"] = (
            path.parent.relative_to(sweep_dir).as_posix() if path.parent != sweep_dir else path.parent.name
        )
        rec["dir"] = str(path.parent)
        runs.append(rec)
    return runs, notes


def grid_notes(sweep_dir: Path, runs: list[dict], skip: Path | None = None) -> list[str]:
    """What each sweep under ``sweep_dir`` (a ``multirun.yaml``) expects and what its runs are.

    Jobs of the grid with no record, records of jobs outside the grid (an earlier command's),
    and several records of one job. A run belongs to the nearest sweep above it.
    """
    sweeps = sorted(
        (p.parent for p in sweep_dir.rglob(sweep.MULTIRUN) if not _under(p, skip)),
        key=lambda d: len(d.parts),
        reverse=True,
    )
    owned: dict[Path, list[dict]] = {d: [] for d in sweeps}
    for r in runs:
        owner = next((d for d in sweeps if Path(r["dir"]).is_relative_to(d)), None)
        if owner is not None:
            owned[owner].append(r)
    notes = []
    for d in sorted(sweeps):
        where = "" if d == sweep_dir else f"{d.relative_to(sweep_dir).as_posix()}: "
        try:
            grid = sweep.read_grid(d / sweep.MULTIRUN)
        except sweep.SweepError as e:
            notes.append(f"{where}the grid is unknown, so missing jobs are not listed ({e})")
            continue
        by_key: dict[sweep.JobKey, list[str]] = {}
        for r in owned[d]:
            try:
                by_key.setdefault(grid.key(r.get("overrides") or []), []).append(r["job"])
            except sweep.SweepError as e:
                notes.append(f"{r['job']}: its overrides cannot be read ({e})")
        keys = grid.keys()
        missing = [grid.describe(job) for job, key in zip(grid.jobs, keys, strict=True) if key not in by_key]
        if missing:
            notes.append(
                f"{where}{len(missing)} of {len(keys)} jobs have no result yet: " + "; ".join(missing)
            )
        expected = set(keys)
        outside = sorted(job for key, jobs in by_key.items() if key not in expected for job in jobs)
        if outside:
            notes.append(
                f"{where}{len(outside)} {'run is' if len(outside) == 1 else 'runs are'} not in the grid of "
                f"{d / sweep.MULTIRUN} "
                "(from an earlier command?): " + "; ".join(outside)
            )
        for jobs in by_key.values():
            if len(jobs) > 1:
                notes.append(f"{len(jobs)} records of one job: " + "; ".join(sorted(jobs)))
    return notes


def tidy(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for r in runs:
        cfg = r.get("config", {})
        opt, adv_train = cfg.get("optimizer", {}), cfg.get("adversarial_training", {})
        final = r.get("final", {})
        lr = effective_lr(opt.get("lr_rule"), opt.get("lr"), opt.get("lr_ratio"), opt.get("batch_size"))
        row = {
            "job": r["job"],
            "status": r.get("status"),
            "stop_reason": r.get("stop_reason"),
            "model": str(cfg.get("model", {}).get("_target_", "")).rsplit(".", 1)[-1],
            "data": cfg.get("data", {}).get("name"),
            "batch_size": opt.get("batch_size"),
            "lr_rule": opt.get("lr_rule"),
            "lr": lr,
            "lr_ratio": opt.get("lr_ratio"),
            "momentum": opt.get("momentum"),
            "training": "adversarial" if adv_train.get("enabled") else "natural",
            "seed": cfg.get("seed"),
            "epochs": r.get("stopped_at_epoch"),
            "steps": r.get("stopped_at_step"),
            "wall_time_s": r.get("wall_time_s"),
            "error": r.get("error"),
        }
        for key in ("train_eval/loss", "train_eval/acc", "test/loss", "test/acc", "val/acc", "gen_gap/acc"):
            row[key.replace("train_eval", "train")] = _num(final.get(key))
        for key, value in final.items():  # every final metric, a user callback's too
            row.setdefault(key, _num(value))
        if row.get("lr") and row.get("momentum") is not None:
            row["stability_threshold"] = 2 * (1 + row["momentum"]) / row["lr"]
        rows.append(row)
    return pd.DataFrame(rows)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# ---- figures -----------------------------------------------------------------------------
def _series(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    keys = [k for k in ("lr_rule", "momentum", "training") if df[k].nunique(dropna=False) > 1] or ["lr_rule"]
    out = []
    for values, part in df.groupby(keys, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        out.append((label, part))
    return out


def _mean_std(part: pd.DataFrame, col: str) -> pd.DataFrame:
    g = part.groupby("batch_size")[col]
    return pd.DataFrame({"mean": g.mean(), "std": g.std().fillna(0.0)}).reset_index()


def _plot_vs_batch(ax, df, col, ylabel, threshold=False):
    for label, part in _series(df):
        if col not in part or part[col].isna().all():
            continue
        s = _mean_std(part.dropna(subset=[col]), col)
        line = ax.errorbar(s["batch_size"], s["mean"], yerr=s["std"], marker="o", capsize=3, label=label)
        if threshold and "stability_threshold" in part:
            t = part.groupby("batch_size")["stability_threshold"].mean()
            ax.plot(
                t.index, t.values, ls="--", color=line[0].get_color(), alpha=0.6, label=f"2(1+β)/lr, {label}"
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def figure_eigenvalue(df, out):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _plot_vs_batch(axes[0], df, "hessian/lambda_1", "top Hessian eigenvalue λ1", threshold=True)
    axes[0].set_yscale("log")
    axes[0].set_title("curvature at the end of training")
    _plot_vs_batch(axes[1], df, "train/loss", "final train loss")
    axes[1].set_yscale("log")
    axes[1].set_title("how far training went (compare at convergence)")
    _legend(axes[0], fontsize=7)
    _save(fig, out / "eigenvalue_vs_batch.png")


def figure_accuracy(df, out):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _plot_vs_batch(axes[0], df, "test/acc", "test accuracy")
    _plot_vs_batch(axes[1], df, "gen_gap/acc", "generalization gap (train acc − test acc)")
    _legend(axes[0], fontsize=7)
    _save(fig, out / "accuracy_vs_batch.png")


def adv_columns(df) -> dict[str, list[tuple[float, str]]]:
    by_attack: dict[str, list[tuple[float, str]]] = {}
    for col in df.columns:
        m = ADV_KEY.match(col)
        if m:
            by_attack.setdefault(m["attack"], []).append((float(m["eps"]), col))
    return {a: sorted(v) for a, v in by_attack.items()}


def figure_robust(df, out):
    attacks = adv_columns(df)
    if not attacks:
        return
    fig, axes = plt.subplots(1, len(attacks), figsize=(6 * len(attacks), 4.5), squeeze=False)
    for ax, (attack, cols) in zip(axes[0], sorted(attacks.items()), strict=True):
        for label, part in _series(df):
            for b, sub in part.groupby("batch_size"):
                eps = [e for e, _ in cols]
                acc = [sub[c].mean() for _, c in cols]
                ax.plot(eps, acc, marker="o", label=f"B={b}, {label}")
        ax.set_title(f"robust accuracy, {attack}")
        ax.set_xlabel("eps (pixel units)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    _legend(axes[0][0], fontsize=6, ncol=2)
    _save(fig, out / "robust_vs_eps.png")


def figure_momentum(df, out):
    rules = sorted(df["lr_rule"].dropna().unique())
    if df["momentum"].nunique() < 2:
        return
    fig, axes = plt.subplots(2, len(rules), figsize=(6 * len(rules), 8), squeeze=False)
    for j, rule in enumerate(rules):
        part = df[df["lr_rule"] == rule]
        for m, sub in part.groupby("momentum"):
            for i, (col, name) in enumerate((("test/acc", "test accuracy"), ("hessian/lambda_1", "λ1"))):
                if col in sub:
                    s = _mean_std(sub.dropna(subset=[col]), col)
                    axes[i][j].errorbar(
                        s["batch_size"],
                        s["mean"],
                        yerr=s["std"],
                        marker="o",
                        capsize=3,
                        label=f"momentum {m}",
                    )
                axes[i][j].set_xscale("log", base=2)
                axes[i][j].set_ylabel(name)
                axes[i][j].grid(alpha=0.3)
        axes[0][j].set_title(f"lr rule: {rule}")
        axes[1][j].set_xlabel("batch size")
        _legend(axes[0][j], fontsize=8)
    _save(fig, out / "momentum.png")


def figure_robust_training(df, out):
    if df["training"].nunique() < 2:
        return
    attacks = adv_columns(df)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _plot_vs_batch(axes[0], df, "hessian/lambda_1", "top Hessian eigenvalue λ1")
    axes[0].set_yscale("log")
    if attacks:
        attack, cols = sorted(attacks.items())[-1]
        eps, col = cols[len(cols) // 2]
        _plot_vs_batch(axes[1], df, col, f"robust accuracy ({attack}, eps {eps:g})")
    _legend(axes[0], fontsize=8)
    axes[0].set_title("natural vs adversarial training")
    _save(fig, out / "natural_vs_robust.png")


def figure_run(run: dict, out: Path):
    history = run.get("history", [])
    cfg = run.get("config", {}).get("optimizer", {})
    lr = effective_lr(cfg.get("lr_rule"), cfg.get("lr"), cfg.get("lr_ratio"), cfg.get("batch_size"))
    by_epoch: dict[int, dict] = {}
    for row in history:
        if "epoch" in row:
            by_epoch.setdefault(int(row["epoch"]), {}).update(row)
    if not by_epoch:
        return
    epochs = sorted(by_epoch)

    def series(key):
        pts = [(e, _num(by_epoch[e].get(key))) for e in epochs if key in by_epoch[e]]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x, y = series("hessian/lambda_1")
    axes[0].plot(x, y, marker="o", label="λ1")
    if lr:
        axes[0].axhline(2 * (1 + cfg.get("momentum", 0)) / lr, ls="--", color="gray", label="2(1+β)/lr")
    axes[0].set_yscale("log")
    axes[0].set_title("top Hessian eigenvalue")
    _legend(axes[0], fontsize=8)
    for key, label in (("train_eval/acc", "train"), ("test/acc", "test")):
        x, y = series(key)
        axes[1].plot(x, y, marker=".", label=label)
    axes[1].set_title("accuracy")
    _legend(axes[1], fontsize=8)
    adv_keys = {k for e in epochs for k in by_epoch[e] if ADV_KEY.match(k)}
    eps_values = sorted({float(ADV_KEY.match(k)["eps"]) for k in adv_keys})
    attacks = sorted({ADV_KEY.match(k)["attack"] for k in adv_keys})
    for key in sorted(adv_keys):  # colour = eps, line style = attack
        m = ADV_KEY.match(key)
        x, y = series(key)
        axes[2].plot(
            x,
            y,
            marker=".",
            color=plt.cm.viridis(eps_values.index(float(m["eps"])) / max(len(eps_values) - 1, 1)),
            ls=("-", "--", ":", "-.")[attacks.index(m["attack"]) % 4],
            label=key.removeprefix("adv/"),
        )
    axes[2].set_title("robust accuracy")
    _legend(axes[2], fontsize=6, ncol=2)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run['job']}  ({run.get('status')}, stopped: {run.get('stop_reason')})", fontsize=9)
    _save(fig, out / "runs" / f"{run['job']}.png")


def _legend(ax, **kwargs):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _save(fig, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------
def report(sweep_dir: Path, out: Path | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Write the CSV and figures; return the table and the readable notes about missing jobs."""
    out = out or sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs, notes = load_runs(sweep_dir, skip=out)
    notes += grid_notes(sweep_dir, runs, skip=out)
    for r in runs:
        if r.get("status") not in FINISHED:
            notes.append(f"{r['job']}: {r.get('status')}" + (f" ({r['error']})" if r.get("error") else ""))
        elif r.get("status") == "diverged":
            notes.append(f"{r['job']}: diverged (excluded from the figures)")
    df = tidy(runs)
    df.to_csv(out / "runs.csv", index=False)
    good = df[df["status"] == "completed"] if len(df) else df
    if len(good):
        figure_eigenvalue(good, out)
        figure_accuracy(good, out)
        figure_robust(good, out)
        figure_momentum(good, out)
        figure_robust_training(good, out)
        for r in runs:
            if r.get("status") == "completed":
                figure_run(r, out)
    return df, notes


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

    One row per (series, x): the mean over seeds (``std`` beside it), a series per lr rule /
    momentum / training as in the PNGs; λ1 with its stability threshold as a series of its own,
    robust accuracy vs eps per attack and batch size.
    """
    out = {}
    for key, col, title in CHARTS:
        if col not in df or df[col].isna().all():
            continue
        y, rows = _field(col), []
        for label, part in _series(df):
            s = _mean_std(part.dropna(subset=[col]), col)
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
        for label, part in _series(df):
            for b, sub in part.groupby("batch_size"):
                rows += [
                    {
                        "eps": e,
                        "robust_acc": sub[c].mean(),
                        "std": _num(sub[c].std()),
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
    as images (``figures/*``)."""
    import wandb

    runs, _ = load_runs(sweep_dir, skip=out)
    group = runs[0].get("config", {}).get("experiment_name", sweep_dir.name) if runs else sweep_dir.name
    mode = wandb_mode()
    run = wandb.init(
        project="sgd-curvature",
        group=group,
        tags=[str(group)],
        job_type="report",
        name=f"report-{sweep_dir.name}",
        dir=str(out),
        mode=mode,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tables and figures of a sweep directory.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <sweep_dir>/report)")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the table and figures as a W&B report run"
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir / "report"
    df, notes = report(args.sweep_dir, out)
    print(f"[report] {len(df)} runs -> {out / 'runs.csv'}")
    for png in sorted(out.rglob("*.png")):
        print(f"[report] figure: {png}")
    for note in notes:
        print(f"[report] note: {note}")
    if args.wandb:
        log_to_wandb(args.sweep_dir, out, df)
    return 0


if __name__ == "__main__":
    sys.exit(main())
