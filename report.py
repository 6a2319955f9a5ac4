"""Turn a sweep directory (finished or not) into one tidy CSV and the papers' figures.

    python report.py outputs/sweeps/fixed_lr_small [--out DIR] [--wandb] [verdict options]

Reads every job's ``results.json`` under the sweep directory and writes, into ``DIR``
(default ``<sweep dir>/report``):

- ``runs.csv``: one row per job: status, why it stopped, whether that was its training target
  (``reached_target``: empty when it had none), hyperparameters, final train/test loss and
  accuracy, generalization gap, Hessian eigenvalues, robust accuracies, wall time, the stability
  threshold 2(1+β)/lr, ``eos_ratio`` = λ1·lr/(2(1+β)) and ``lr_limited`` (eos_ratio >= 0.8);
- ``not_at_target.csv``: the completed runs that stopped short of their target (epoch or step cap);
- ``verdicts.csv``, ``verdicts.md``: the study's trends judged over seeds (λ1, test and robust
  accuracy vs batch size; momentum; adversarial vs natural training), each with its per-seed
  values; the runs limited by lr; the worst-case gap (PGD vs AutoAttack) where measured;
- ``eigenvalue_vs_batch.png``: top Hessian eigenvalue vs batch size per (lr rule, momentum,
  training), with the stability threshold 2(1+β)/lr drawn, beside the final training loss;
- ``accuracy_vs_batch.png``: test accuracy and generalization gap vs batch size;
- ``robust_vs_eps.png``: robust accuracy vs eps, one line per batch size, per attack;
- ``momentum.png``: test accuracy and top eigenvalue vs batch size for each momentum,
  fixed lr vs constant ratio side by side (natural training only, when both kinds were run);
- ``natural_vs_robust.png``: natural vs adversarial training across batch sizes;
- ``runs/<job>.png``: per-run curves over epochs (top eigenvalue with its 2(1+β)/lr line,
  train/test accuracy, robust accuracy).

Points are means over the seeds at target with error bars of one standard deviation; runs short of
their target are drawn as hollow squares and left out of the means and verdicts. A partial sweep is
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
import dataclasses
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
TARGET_REASONS = frozenset({"target_train_acc", "target_train_loss"})
EOS_THRESHOLD = 0.8  # eos_ratio at or above this: λ1 is at the stability threshold, limited by lr


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


def training_target(record: dict) -> str | None:
    """The run's training target as text (``train acc >= 0.97``), or None when it had none."""
    t = (record.get("config", {}).get("callbacks") or {}).get("training_target") or {}
    parts = []
    if t.get("target_train_acc") is not None:
        parts.append(f"train acc >= {t['target_train_acc']:g}")
    if t.get("target_train_loss") is not None:
        parts.append(f"train loss <= {t['target_train_loss']:g}")
    return " or ".join(parts) or None


def reached_target(record: dict) -> bool | None:
    """Whether the run stopped because it reached its training target (``stop_reason``
    ``target_train_acc`` or ``target_train_loss``). None for a run with no target configured:
    it ran its budget by design, there was nothing to reach, and it is compared where it stopped."""
    if record.get("stop_reason") in TARGET_REASONS:
        return True
    return None if training_target(record) is None else False


def tidy(runs: list[dict], eos_threshold: float = EOS_THRESHOLD) -> pd.DataFrame:
    """One row per record. Beside the final metrics: ``reached_target`` (see :func:`reached_target`),
    ``target``, ``stability_threshold`` 2(1+β)/lr, ``eos_ratio`` λ1·lr/(2(1+β)) (how close λ1 came to
    it; lr before any schedule) and ``lr_limited`` (``eos_ratio >= eos_threshold``)."""
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
            "reached_target": reached_target(r),
            "target": training_target(r),
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
            row["eos_ratio"] = _num(row.get("hessian/lambda_1")) / row["stability_threshold"]
        else:
            row["stability_threshold"] = row["eos_ratio"] = math.nan
        row["lr_limited"] = bool(row["eos_ratio"] >= eos_threshold)
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


def at_target(df: pd.DataFrame) -> pd.Series:
    """The runs that count in means and verdicts: reached their target, or had none to reach."""
    if "reached_target" not in df:
        return pd.Series(True, index=df.index)
    return ~df["reached_target"].eq(False)


def _draw_vs_batch(ax, part, col, label, color):
    """Mean ± std over the seeds at target as a line; each run short of its target as a hollow square
    (not in the mean). Returns whether anything was drawn."""
    part = part.dropna(subset=[col])
    ok = at_target(part)
    if ok.any():
        s = _mean_std(part[ok], col)
        ax.errorbar(
            s["batch_size"], s["mean"], yerr=s["std"], marker="o", capsize=3, color=color, label=label
        )
    if (~ok).any():
        ax.plot(
            part.loc[~ok, "batch_size"],
            part.loc[~ok, col],
            ls="none",
            marker="s",
            markersize=7,
            markerfacecolor="none",
            markeredgecolor=color,
            label=f"not at target, {label}",
        )
    return len(part) > 0


def _plot_vs_batch(ax, df, col, ylabel, threshold=False):
    for i, (label, part) in enumerate(_series(df)):
        color = f"C{i % 10}"
        if col not in part or not _draw_vs_batch(ax, part, col, label, color):
            continue
        if threshold and "stability_threshold" in part:
            t = part.groupby("batch_size")["stability_threshold"].mean()
            ax.plot(t.index, t.values, ls="--", color=color, alpha=0.6, label=f"2(1+β)/lr, {label}")
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
    """Robust accuracy vs eps, one panel per attack (rows of 3): colour = series (lr rule, momentum,
    training), line style = batch size; a run short of its target is its own hollow, dotted line."""
    attacks = adv_columns(df)
    if not attacks:
        return
    ncols = min(3, len(attacks))
    nrows = math.ceil(len(attacks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.5 * nrows), squeeze=False)
    styles = [("-", "o"), ("--", "^"), ("-.", "D"), (":", "v")]
    sizes = sorted(df["batch_size"].dropna().unique())
    for ax, (attack, cols) in zip(axes.flat, sorted(attacks.items()), strict=False):  # spare panels hidden
        eps = [e for e, _ in cols]
        for n, (label, part) in enumerate(_series(df)):
            color = f"C{n % 10}"
            for b, sub in part.groupby("batch_size"):
                ls, marker = styles[sizes.index(b) % len(styles)]
                ok = at_target(sub)
                if ok.any():
                    acc = [sub.loc[ok, c].mean() for _, c in cols]
                    ax.plot(eps, acc, ls=ls, marker=marker, color=color, label=f"B={b}, {label}")
                for i, (_, run) in enumerate(sub[~ok].iterrows()):  # each run short of its target
                    ax.plot(
                        eps,
                        [run[c] for _, c in cols],
                        ls=":",
                        marker="s",
                        markerfacecolor="none",
                        color=color,
                        label=f"B={b}, {label}, not at target" if i == 0 else None,
                    )
        ax.set_title(f"robust accuracy, {attack}")
        ax.set_xlabel("eps (pixel units)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(attacks) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    bottom = 0.0
    if handles:  # one legend for every panel, below them
        bottom = min(0.5, 0.3 * math.ceil(len(labels) / 3) / (4.5 * nrows))
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    _save(fig, out / "robust_vs_eps.png", rect=(0, bottom, 1, 1))


def figure_momentum(df, out):
    rules = sorted(df["lr_rule"].dropna().unique())
    if df["momentum"].nunique() < 2:
        return
    if df["training"].nunique() > 1 and (df["training"] == "natural").any():
        df = df[df["training"] == "natural"]  # adversarial training is natural_vs_robust.png's
    fig, axes = plt.subplots(2, len(rules), figsize=(6 * len(rules), 8), squeeze=False)
    for j, rule in enumerate(rules):
        part = df[df["lr_rule"] == rule]
        for k, (m, sub) in enumerate(part.groupby("momentum")):
            for i, (col, name) in enumerate((("test/acc", "test accuracy"), ("hessian/lambda_1", "λ1"))):
                if col in sub:
                    _draw_vs_batch(axes[i][j], sub, col, f"momentum {m}", f"C{k % 10}")
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


def _save(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- verdicts ------------------------------------------------------------------------------
ROBUST_ATTACKS = ("autoattack_linf", "worst_linf", "pgd_linf")  # the robust accuracy judged, first found
VERDICTS = ("rises", "falls", "flat", "mixed", "untestable")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """What the verdicts call a change (the ``report.py`` options of the same names)."""

    ratio: float = 1.5  # λ1: rises if every seed's ratio >= this, falls if every one <= 1/this
    points: float = 2.0  # accuracies: rises/falls if every seed's difference is >= +/- this many points
    min_seeds: int = 2  # fewer seeds at target at a grid point compared: untestable
    eos: float = EOS_THRESHOLD  # eos_ratio >= this: the run is limited by its learning rate
    robust_eps: float = 0.1  # the eps of the robust accuracy judged
    momenta: tuple[float, float] = (0.0, 0.9)  # momentum verdicts: the second minus the first

    def __post_init__(self):
        for ok, name, value, must in (
            (self.ratio > 1, "ratio threshold", self.ratio, "must be > 1"),
            (self.points >= 0, "points threshold", self.points, "must be >= 0"),
            (self.min_seeds >= 1, "min seeds", self.min_seeds, "must be >= 1"),
            (self.eos > 0, "eos threshold", self.eos, "must be > 0"),
            (self.robust_eps >= 0, "robust eps", self.robust_eps, "must be >= 0"),
            (len(self.momenta) == 2, "momenta", self.momenta, "must be two values"),
        ):
            if not ok:
                raise ValueError(f"{name} {value!r} {must}")


def classify(values: list[float], measure: str, th: Thresholds) -> str:
    """rises / falls / flat / mixed for per-seed ratios (``measure="ratio"``) or point differences.

    rises if every value >= up, falls if every value <= down, flat if every value is within
    [down, up], else mixed; up/down are ``ratio``/``1/ratio`` or ``+points``/``-points``. A value
    exactly on a threshold counts as a change (rises/falls are tested first).
    """
    up, down = (th.ratio, 1 / th.ratio) if measure == "ratio" else (th.points, -th.points)
    if all(v >= up for v in values):
        return "rises"
    if all(v <= down for v in values):
        return "falls"
    if all(down <= v <= up for v in values):
        return "flat"
    return "mixed"


def robust_column(df: pd.DataFrame, eps: float) -> tuple[str | None, str]:
    """The robust accuracy the verdicts judge: ``adv/<attack>/eps<eps>`` for the first attack of
    :data:`ROBUST_ATTACKS` the runs have at ``eps``; else None and why."""
    attacks = adv_columns(df)
    for attack in ROBUST_ATTACKS:
        for e, col in attacks.get(attack, []):
            if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12):
                return col, ""
    have = "; ".join(
        f"{a}: eps {', '.join(f'{e:g}' for e, _ in cols)}" for a, cols in sorted(attacks.items())
    )
    return None, (
        f"no robust accuracy at eps {eps:g} from {', '.join(ROBUST_ATTACKS)} (runs have: {have or 'none'})"
    )


def _fmt(v: float, pct: bool) -> str:
    return f"{100 * v:.1f}" if pct else f"{v:.4g}"


def compare(cell: pd.DataFrame, vary: str, lo, hi, col: str, measure: str, th: Thresholds) -> dict:
    """One verdict: ``col`` at ``vary = hi`` against ``vary = lo``, per seed, within ``cell``.

    ``cell`` holds the candidate runs (completed; those short of their target are dropped here).
    Per seed: hi/lo (``measure="ratio"``) or 100·(hi − lo) points (``"points"``, accuracies in [0, 1]).
    Untestable if either point has fewer than ``th.min_seeds`` seeds at target with a value, or fewer
    seeds than that have both (or a ratio of non-positive values).
    """
    pct = measure == "points"
    if col not in cell:  # no run logged it (e.g. a sweep without the Hessian callback)
        cell = cell.assign(**{col: math.nan})
    runs = cell[at_target(cell)].dropna(subset=[col])
    per = {}
    for v in (lo, hi):
        sel = runs[vary].map(lambda x, v=v: _same(x, v)).astype(bool)  # empty: still a row mask
        per[v] = runs.loc[sel].groupby("seed", dropna=False)[col].mean()
    counts = {v: len(per[v]) for v in (lo, hi)}
    rows, values = [], []
    for seed in sorted(set(per[lo].index) & set(per[hi].index), key=str):
        a, b = float(per[lo][seed]), float(per[hi][seed])
        if pct:
            r = 100 * (b - a)
            rows.append(f"seed {seed}: {_fmt(a, pct)} -> {_fmt(b, pct)} ({r:+.1f} pts)")
        else:
            r = b / a if a > 0 and b > 0 else math.nan
            rows.append(f"seed {seed}: {_fmt(a, pct)} -> {_fmt(b, pct)} (x{r:.3g})")
        if math.isfinite(r):
            values.append(r)
    few = [v for v in (lo, hi) if counts[v] < th.min_seeds]
    if few:
        verdict = "untestable"
        reason = (
            "; ".join(
                f"{_point(vary, v)}: {counts[v]} seed{'s' if counts[v] != 1 else ''} at target" for v in few
            )
            + f" (need {th.min_seeds})"
        )
    elif len(values) < th.min_seeds:
        verdict = "untestable"
        reason = f"{len(values)} seeds comparable at both points (need {th.min_seeds})"
    else:
        verdict, reason = classify(values, measure, th), ""
    return {
        "compared": f"{_point(vary, hi)} vs {_point(vary, lo)}",
        "measure": measure,
        "verdict": verdict,
        "n_seeds": len(values),
        "values": ", ".join(f"{v:.4g}" for v in values),
        "per_seed": "; ".join(rows),
        "seeds_at_target": f"{_point(vary, lo)}: {counts[lo]}; {_point(vary, hi)}: {counts[hi]}",
        "reason": reason,
    }


def _same(x, v) -> bool:
    if isinstance(x, int | float) and isinstance(v, int | float):
        return math.isclose(x, v, rel_tol=1e-9, abs_tol=1e-12)
    return x == v


def _point(vary: str, v) -> str:
    prefix = {"batch_size": "B=", "momentum": "β="}.get(vary)
    return f"{prefix}{v:g}" if prefix else str(v)


EXPECTED = {  # STUDY.md's trends, natural training: (metric, lr rule) -> verdict vs batch size
    ("lambda_1", "fixed"): "rises",
    ("lambda_1", "ratio"): "flat",
    ("test_acc", "fixed"): "falls",
    ("test_acc", "ratio"): "flat",
    ("robust_acc", "fixed"): "falls",
    ("robust_acc", "ratio"): "flat",
}


def verdicts(df: pd.DataFrame, th: Thresholds | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The study's trends judged over seeds; returns the table and notes on what was skipped.

    - ``batch_size``: per (lr rule, momentum, training) and metric, the largest batch size of the
      cell against its smallest (the grid's, whatever reached its target);
    - ``momentum``: per (lr rule, training, batch size) that has runs of both, ``th.momenta[1]``
      against ``th.momenta[0]``, for test accuracy and λ1;
    - ``training``: per (lr rule, momentum, batch size) that has runs of both, λ1 of adversarial
      against natural training.
    Only completed runs count, and of them those at target (:func:`at_target`).
    """
    th = th or Thresholds()
    notes: list[str] = []
    rows: list[dict] = []
    if not len(df) or "batch_size" not in df:
        return pd.DataFrame(rows), notes
    done = df[df["status"] == "completed"]
    rcol, why = robust_column(df, th.robust_eps)
    if rcol is None:
        notes.append(f"robust accuracy verdicts skipped: {why}")
    metrics = [("lambda_1", "hessian/lambda_1", "ratio"), ("test_acc", "test/acc", "points")]
    metrics += [("robust_acc", rcol, "points")] if rcol else []

    def cells(keys):
        for values, cell in df.groupby(keys, dropna=False):
            yield dict(zip(keys, values, strict=True)), cell

    for fixed, cell in cells(["lr_rule", "momentum", "training"]):
        sizes = sorted(cell["batch_size"].dropna().unique())
        if len(sizes) < 2:
            continue
        sub = done.loc[done.index.intersection(cell.index)]
        for name, col, measure in metrics:
            row = {"kind": "batch_size", "metric": name, "column": col, **fixed, "batch_size": math.nan}
            row |= compare(sub, "batch_size", sizes[0], sizes[-1], col, measure, th)
            row["expected"] = (
                EXPECTED.get((name, fixed["lr_rule"]), "") if fixed["training"] == "natural" else ""
            )
            rows.append(row)

    lo, hi = th.momenta
    momenta = df["momentum"].dropna()
    if momenta.map(lambda m: _same(m, lo)).any() and momenta.map(lambda m: _same(m, hi)).any():
        for fixed, cell in cells(["lr_rule", "training", "batch_size"]):
            if not all(cell["momentum"].map(lambda x, m=m: _same(x, m)).any() for m in (lo, hi)):
                continue  # the grid has no such pair here (a point whose runs failed still counts)
            sub = done.loc[done.index.intersection(cell.index)]
            for name, col, measure in metrics[:2]:
                row = {"kind": "momentum", "metric": name, "column": col, **fixed, "momentum": math.nan}
                rows.append(row | compare(sub, "momentum", lo, hi, col, measure, th) | {"expected": ""})
    elif df["momentum"].nunique() > 1:
        notes.append(f"momentum verdicts skipped: the runs do not have both momentum {lo:g} and {hi:g}")

    if {"natural", "adversarial"} <= set(df["training"]):
        for fixed, cell in cells(["lr_rule", "momentum", "batch_size"]):
            if not {"natural", "adversarial"} <= set(cell["training"]):
                continue
            sub = done.loc[done.index.intersection(cell.index)]
            row = {"kind": "training", "metric": "lambda_1", "column": "hessian/lambda_1", **fixed}
            row |= compare(sub, "training", "natural", "adversarial", "hessian/lambda_1", "ratio", th)
            rows.append(row | {"training": math.nan, "expected": "falls"})
    columns = ["kind", "metric", "lr_rule", "momentum", "training", "batch_size", "compared", "verdict"]
    columns += ["expected", "measure", "n_seeds", "values", "per_seed", "seeds_at_target", "reason", "column"]
    return pd.DataFrame(rows, columns=columns), notes


def worst_case_gap(df: pd.DataFrame) -> pd.DataFrame | None:
    """Per eps, how far the epoch-end PGD accuracy is above the worst case (``autoattack_linf``), in
    points over the completed runs that have both: mean, max and the run of the max. None when the
    runs have no ``adv/autoattack_linf/eps*`` (or no PGD at the same eps)."""
    attacks = adv_columns(df)
    pgd = dict(attacks.get("pgd_linf", []))
    rows = []
    for eps, col in attacks.get("autoattack_linf", []):
        pcol = next((c for e, c in pgd.items() if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12)), None)
        if pcol is None:
            continue
        both = df[df["status"] == "completed"].dropna(subset=[col, pcol])
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


def _md_table(df: pd.DataFrame, columns: list[str]) -> list[str]:
    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df[columns].itertuples(index=False)]
    return lines


def write_verdicts(df, table, gap, notes, th: Thresholds, out: Path) -> None:
    """``verdicts.csv`` and ``verdicts.md`` (thresholds, verdicts with their per-seed values, runs
    limited by lr, runs short of their target, the worst-case gap) in ``out``."""
    table.to_csv(out / "verdicts.csv", index=False)
    md = [
        "# Verdicts",
        "",
        f"Thresholds: ratio {th.ratio:g} (λ1: *rises* if every seed's ratio is >= {th.ratio:g}, *falls* "
        f"if every one is <= 1/{th.ratio:g} = {1 / th.ratio:.3g}, *flat* if every one is in between, else "
        f"*mixed*); points {th.points:g} (accuracies: the same with differences in percentage points, "
        f"+/-{th.points:g}); at least {th.min_seeds} seeds at target at each point compared, else "
        f"*untestable*; robust accuracy at eps {th.robust_eps:g} (first of {', '.join(ROBUST_ATTACKS)} "
        f"the runs have); momentum: β={th.momenta[1]:g} vs β={th.momenta[0]:g}; learning-rate limited: "
        f"eos_ratio = λ1·lr/(2(1+β)) >= {th.eos:g}.",
        "",
        "Only completed runs that reached their training target (or had none) count. *expected* is "
        "STUDY.md's trend (natural training). Per seed: the value at the first point -> at the second "
        "(accuracies in %), and the ratio or the difference judged.",
        "",
    ]
    titles = {
        "batch_size": "## Batch size: the largest against the smallest",
        "momentum": f"## Momentum: β={th.momenta[1]:g} against β={th.momenta[0]:g}",
        "training": "## Adversarial against natural training: λ1",
    }
    cols = ["metric", "lr_rule", "momentum", "training", "batch_size", "compared", "verdict", "expected"]
    cols += ["per_seed", "reason"]
    for kind, title in titles.items():
        part = table[table["kind"] == kind] if len(table) else table
        if len(part):
            md += [title, "", *_md_table(part, [c for c in cols if part[c].notna().any()]), ""]
    ok = df[df["status"] == "completed"] if len(df) else df
    md += [f"## Runs limited by the learning rate (eos_ratio >= {th.eos:g})", ""]
    lim = ok[ok["lr_limited"]] if "lr_limited" in ok else ok.iloc[:0]
    if len(lim):
        md += _md_table(lim, ["job", "batch_size", "lr", "momentum", "hessian/lambda_1", "eos_ratio"])
    else:
        md.append("none")
    md += ["", "## Runs short of their training target (hollow markers, left out of means and verdicts)", ""]
    short = ok[~at_target(ok)] if len(ok) else ok
    if len(short):
        md += _md_table(short, [c for c in NOT_AT_TARGET if c in short])
    else:
        md.append("none")
    md += ["", "## Worst-case gap: epoch-end PGD minus AutoAttack accuracy (points)", ""]
    if gap is not None:
        md += _md_table(gap, list(gap.columns))
    else:
        md.append("no adv/autoattack_linf/eps* keys in the runs: skipped")
    if notes:
        md += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    (out / "verdicts.md").write_text("\n".join(md) + "\n")


NOT_AT_TARGET = [
    "job",
    "stop_reason",
    "target",
    "batch_size",
    "lr_rule",
    "lr",
    "momentum",
    "training",
    "seed",
]
NOT_AT_TARGET += ["epochs", "steps", "train/acc", "train/loss"]


# ---- main ------------------------------------------------------------------------------------
def report(
    sweep_dir: Path, out: Path | None = None, thresholds: Thresholds | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Write the CSVs, figures and verdicts; return the table and the readable notes."""
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
    table, verdict_notes = verdicts(df, th)
    gap = worst_case_gap(good) if len(good) else None
    if gap is not None:
        gap.to_csv(out / "worst_case_gap.csv", index=False)
    else:
        verdict_notes.append("worst-case gap skipped: the runs have no adv/autoattack_linf/eps* keys")
    write_verdicts(df, table, gap, verdict_notes, th, out)
    notes += verdict_notes
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
                f"{r.job} ({r.stop_reason}, train acc {_num(getattr(r, 'train_acc', math.nan)):.3g})"
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
            s = _mean_std(part[at_target(part)].dropna(subset=[col]), col)
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
            for b, sub in part[at_target(part)].groupby("batch_size"):
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
    d = Thresholds()
    verdict = parser.add_argument_group("verdicts (verdicts.csv, verdicts.md)")
    verdict.add_argument(
        "--ratio-threshold", type=float, default=d.ratio, help=f"λ1 ratio called a change (default {d.ratio})"
    )
    verdict.add_argument(
        "--points-threshold",
        type=float,
        default=d.points,
        help=f"accuracy difference in points called a change (default {d.points})",
    )
    verdict.add_argument(
        "--min-seeds",
        type=int,
        default=d.min_seeds,
        help=f"seeds at target needed at each point compared (default {d.min_seeds})",
    )
    verdict.add_argument(
        "--eos-threshold",
        type=float,
        default=d.eos,
        help=f"eos_ratio = λ1·lr/(2(1+β)) from which a run counts as limited by lr (default {d.eos})",
    )
    verdict.add_argument(
        "--robust-eps",
        type=float,
        default=d.robust_eps,
        help=f"eps of the robust accuracy judged (default {d.robust_eps})",
    )
    verdict.add_argument(
        "--momenta",
        type=float,
        nargs=2,
        default=list(d.momenta),
        metavar=("LOW", "HIGH"),
        help="momentum verdicts compare HIGH against LOW (default 0 0.9)",
    )
    args = parser.parse_args(argv)
    try:
        th = Thresholds(
            args.ratio_threshold,
            args.points_threshold,
            args.min_seeds,
            args.eos_threshold,
            args.robust_eps,
            tuple(args.momenta),
        )
    except ValueError as e:
        parser.error(str(e))
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir / "report"
    df, notes = report(args.sweep_dir, out, th)
    print(f"[report] {len(df)} runs -> {out / 'runs.csv'}")
    print(f"[report] verdicts -> {out / 'verdicts.md'}")
    for png in sorted(out.rglob("*.png")):
        print(f"[report] figure: {png}")
    for note in notes:
        print(f"[report] note: {note}")
    if args.wandb:
        log_to_wandb(args.sweep_dir, out, df)
    return 0


if __name__ == "__main__":
    sys.exit(main())
