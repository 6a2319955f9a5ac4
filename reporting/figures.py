"""The report's figures (PNG).

Points are means over the seeds whose value counts (:func:`reporting.runs.counted`) with error bars
of one standard deviation; every value that does not count is drawn hollow, so nothing measured is
hidden and nothing doubtful is averaged: a run short of its training target as a hollow square, a
value from a measurement that did not converge as a hollow diamond.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lifecycle.record import run_lr, stability_threshold  # noqa: E402
from reporting.batch_figures import figure_batch_schedule  # noqa: E402
from reporting.runs import ADV_KEY, adv_columns, at_target, converged, counted, fixed_batch, num  # noqa: E402


def series(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The runs split by whichever of lr rule, momentum, training vary; each with its label."""
    keys = [k for k in ("lr_rule", "momentum", "training") if df[k].nunique(dropna=False) > 1] or ["lr_rule"]
    out = []
    for values, part in df.groupby(keys, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        out.append((label, part))
    return out


def mean_std(part: pd.DataFrame, col: str) -> pd.DataFrame:
    g = part.groupby("batch_size")[col]
    return pd.DataFrame({"mean": g.mean(), "std": g.std().fillna(0.0)}).reset_index()


HOLLOW = (  # (which runs, marker, label prefix): values drawn but not counted
    (lambda part, col: ~at_target(part), "s", "not at target"),
    (lambda part, col: at_target(part) & ~converged(part, col), "D", "unconverged"),
)


def draw_vs_batch(ax, part, col, label, color):
    """Mean ± std over the values that count as a line; every other value hollow (not in the mean):
    a run short of its target as a square, an unconverged measurement as a diamond.
    Returns whether anything was drawn."""
    part = part.dropna(subset=[col])
    ok = counted(part, col)
    if ok.any():
        s = mean_std(part[ok], col)
        ax.errorbar(
            s["batch_size"], s["mean"], yerr=s["std"], marker="o", capsize=3, color=color, label=label
        )
    for which, marker, why in HOLLOW:
        sel = which(part, col)
        if sel.any():
            ax.plot(
                part.loc[sel, "batch_size"],
                part.loc[sel, col],
                ls="none",
                marker=marker,
                markersize=7,
                markerfacecolor="none",
                markeredgecolor=color,
                label=f"{why}, {label}",
            )
    return len(part) > 0


def plot_vs_batch(ax, df, col, ylabel, threshold=False):
    for i, (label, part) in enumerate(series(df)):
        color = f"C{i % 10}"
        if col not in part or not draw_vs_batch(ax, part, col, label, color):
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
    plot_vs_batch(axes[0], df, "hessian/lambda_1", "top Hessian eigenvalue λ1", threshold=True)
    axes[0].set_yscale("log")
    axes[0].set_title("curvature at the end of training")
    plot_vs_batch(axes[1], df, "train/loss", "final train loss")
    axes[1].set_yscale("log")
    axes[1].set_title("how far training went (compare at convergence)")
    legend(axes[0], fontsize=7)
    save(fig, out / "eigenvalue_vs_batch.png")


def figure_accuracy(df, out):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_vs_batch(axes[0], df, "test/acc", "test accuracy")
    plot_vs_batch(axes[1], df, "gen_gap/acc", "generalization gap (train acc − test acc)")
    legend(axes[0], fontsize=7)
    save(fig, out / "accuracy_vs_batch.png")


def figure_robust(df, out):
    """Robust accuracy vs eps, one panel per attack (rows of 3): colour = series (lr rule, momentum,
    training), line style = batch size; a run whose values do not count is its own hollow, dotted line."""
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
        for n, (label, part) in enumerate(series(df)):
            color = f"C{n % 10}"
            for b, sub in part.groupby("batch_size"):
                ls, marker = styles[sizes.index(b) % len(styles)]
                ok, short = counted(sub, cols[0][1]), ~at_target(sub)  # an attack's columns share a prefix
                if ok.any():
                    acc = [sub.loc[ok, c].mean() for _, c in cols]
                    ax.plot(eps, acc, ls=ls, marker=marker, color=color, label=f"B={b}, {label}")
                for i, (idx, run) in enumerate(sub[~ok].iterrows()):  # each run whose values do not count
                    why = "not at target" if short[idx] else "unconverged"
                    ax.plot(
                        eps,
                        [run[c] for _, c in cols],
                        ls=":",
                        marker="s",
                        markerfacecolor="none",
                        color=color,
                        label=f"B={b}, {label}, {why}" if i == 0 else None,
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
    save(fig, out / "robust_vs_eps.png", rect=(0, bottom, 1, 1))


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
                    draw_vs_batch(axes[i][j], sub, col, f"momentum {m}", f"C{k % 10}")
                axes[i][j].set_xscale("log", base=2)
                axes[i][j].set_ylabel(name)
                axes[i][j].grid(alpha=0.3)
        axes[0][j].set_title(f"lr rule: {rule}")
        axes[1][j].set_xlabel("batch size")
        legend(axes[0][j], fontsize=8)
        top = set(axes[0][j].get_legend_handles_labels()[1])
        if set(axes[1][j].get_legend_handles_labels()[1]) - top:  # a hollow marker only λ1 has
            legend(axes[1][j], fontsize=8)
    save(fig, out / "momentum.png")


def figure_robust_training(df, out):
    if df["training"].nunique() < 2:
        return
    attacks = adv_columns(df)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_vs_batch(axes[0], df, "hessian/lambda_1", "top Hessian eigenvalue λ1")
    axes[0].set_yscale("log")
    if attacks:
        attack, cols = sorted(attacks.items())[-1]
        eps, col = cols[len(cols) // 2]
        plot_vs_batch(axes[1], df, col, f"robust accuracy ({attack}, eps {eps:g})")
    legend(axes[0], fontsize=8)
    axes[0].set_title("natural vs adversarial training")
    save(fig, out / "natural_vs_robust.png")


def figure_input_curvature(df, out):
    """Input λ_max (the examples' mean top eigenvalue of the loss's input Hessian) against robust
    accuracy, one point per run: a colour per activation, a marker per batch size, one panel per
    point set (clean, PGD). Values that do not count (short of target, unconverged) are hollow."""
    sets = sorted(c.split("/")[1] for c in df.columns if c.startswith("input/") and c.endswith("/top_mean"))
    attacks = adv_columns(df)
    if not sets or not attacks:
        return
    attack, cols = sorted(attacks.items())[-1]
    eps, robust = next(((e, c) for e, c in cols if e > 0), cols[-1])
    colors = {a: f"C{i}" for i, a in enumerate(sorted(df["activation"].dropna().unique()))}
    markers = dict(zip(sorted(df["batch_size"].dropna().unique()), "osD^v<>p*", strict=False))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.5), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        col = f"input/{name}/top_mean"
        ok = counted(df, col)
        for (act, b), part in df.groupby(["activation", "batch_size"]):
            for filled, sel in ((True, ok), (False, ~ok)):
                p = part[sel.loc[part.index]]
                if len(p):
                    ax.scatter(p[col], p[robust], marker=markers.get(b, "o"), s=40,
                               facecolors=colors[act] if filled else "none", edgecolors=colors[act],
                               label=f"{act}, B={b:g}" if filled else None)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(f"mean top eigenvalue of the input Hessian ({name})")
        ax.set_ylabel(f"robust accuracy ({attack}, eps {eps:g})")
        ax.set_title(f"input curvature at {name} points")
    legend(axes[0][0], fontsize=8)
    save(fig, out / "input_curvature.png")


def figure_run(run: dict, out: Path):
    """One run's curves over epochs: λ1 with its 2(1+β)/lr line, train/test accuracy, robust accuracy."""
    by_epoch: dict[int, dict] = {}
    for row in run.get("history") or []:
        epoch = num(row.get("epoch"))
        if math.isfinite(epoch):
            by_epoch.setdefault(int(epoch), {}).update(row)
    if not by_epoch:
        return
    epochs = sorted(by_epoch)

    def curve(key):
        pts = [(e, num(by_epoch[e].get(key))) for e in epochs if key in by_epoch[e]]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x, y = curve("hessian/lambda_1")
    axes[0].plot(x, y, marker="o", label="λ1")
    lr, momentum = run_lr(run)
    threshold = stability_threshold(lr, momentum or 0.0)
    if threshold is not None:
        axes[0].axhline(threshold, ls="--", color="gray", label="2(1+β)/lr")
    axes[0].set_yscale("log")
    axes[0].set_title("top Hessian eigenvalue")
    legend(axes[0], fontsize=8)
    for key, label in (("train_eval/acc", "train"), ("test/acc", "test")):
        x, y = curve(key)
        axes[1].plot(x, y, marker=".", label=label)
    axes[1].set_title("accuracy")
    legend(axes[1], fontsize=8)
    adv_keys = {k for e in epochs for k in by_epoch[e] if ADV_KEY.match(k)}
    eps_values = sorted({float(ADV_KEY.match(k)["eps"]) for k in adv_keys})
    attacks = sorted({ADV_KEY.match(k)["attack"] for k in adv_keys})
    for key in sorted(adv_keys):  # colour = eps, line style = attack
        m = ADV_KEY.match(key)
        x, y = curve(key)
        axes[2].plot(
            x,
            y,
            marker=".",
            color=plt.cm.viridis(eps_values.index(float(m["eps"])) / max(len(eps_values) - 1, 1)),
            ls=("-", "--", ":", "-.")[attacks.index(m["attack"]) % 4],
            label=key.removeprefix("adv/"),
        )
    axes[2].set_title("robust accuracy")
    legend(axes[2], fontsize=6, ncol=2)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run['job']}  ({run.get('status')}, stopped: {run.get('stop_reason')})", fontsize=9)
    save(fig, out / "runs" / f"{run['job']}.png")


def legend(ax, **kwargs):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def save(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_all(good: pd.DataFrame, runs: list[dict], out: Path) -> None:
    """Every figure of the completed runs ``good`` (their records ``runs``) into ``out``. The
    figures against batch size draw the fixed-batch runs only (an ABS run is not at its first batch)."""
    figure_batch_schedule(runs, out)
    fixed = fixed_batch(good)
    if len(fixed):
        for figure in (figure_eigenvalue, figure_accuracy, figure_robust, figure_momentum):
            figure(fixed, out)
        figure_robust_training(fixed, out)
        figure_input_curvature(fixed, out)
    for r in runs:
        if r.get("status") == "completed":
            figure_run(r, out)
