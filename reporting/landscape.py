"""Loss landscapes and Hessian densities: the arrays ``measure.py`` saves beside a run, and their PNGs.

``measure.py --landscape 1d 2d --density`` writes, under ``RUN_DIR/measurements/``:

- ``<name>_landscape.npz``: for each measured direction set ``<kind>_<dims>`` (kind ``eigen``: top
  Hessian eigenvectors; ``random``: filter-normalized Gaussian directions) the arrays
  ``<set>/coords0`` [``<set>/coords1``], ``<set>/loss``, ``<set>/accuracy``, and ``eigenvalues``;
  ``meta`` a JSON string (normalizations, BatchNorm mode, samples, checkpoint);
- ``<name>_density.npz``: ``nodes`` and ``weights`` of stochastic Lanczos quadrature (the density is
  their Gaussian broadening, drawn here with the width stated on the figure);
- the PNGs of that run (:func:`draw_run`, :func:`draw_density`).

The report (:func:`draw_sweep`) reads the newest of each per run and draws, per lr rule / training
(one panel each, a colour per batch size): the 1-D curves on shared axes, the densities with one
common broadening, and a contour plot per run of a chosen set. numpy and matplotlib only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

LANDSCAPE_SUFFIX = "_landscape.npz"
DENSITY_SUFFIX = "_density.npz"
TITLES = {
    "eigen": "along the top Hessian eigenvector{s}",
    "random": "along filter-normalized random direction{s}",
}


# ---- arrays ----------------------------------------------------------------------------------------


def save_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, meta=np.array(json.dumps(meta)), **{k: np.asarray(v) for k, v in arrays.items()})


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k != "meta"}
        meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
    return arrays, meta


def newest(run_dir: Path, suffix: str) -> Path | None:
    """The most recently written ``*<suffix>`` under the run's ``measurements/`` (None if none)."""
    found = sorted((Path(run_dir) / "measurements").glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def broadened(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """The SLQ density on ``grid``: Gaussians of width ``sigma`` at the nodes, averaged over vectors
    (the same formula as :meth:`measures.estimators.DensityResult.density`)."""
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    diff = grid[:, None, None] - nodes[None]
    kernel = np.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (kernel * weights[None]).sum(-1).mean(-1)


def default_sigma(nodes: np.ndarray) -> float:
    """1% of the spread of the nodes (as ``DensityResult.density``)."""
    return 0.01 * float(np.max(nodes) - np.min(nodes)) or 1e-12


def _density_curve(nodes, weights, sigma, lo=None, hi=None):
    lo = float(np.min(nodes)) if lo is None else lo
    hi = float(np.max(nodes)) if hi is None else hi
    pad = 0.05 * (hi - lo) + 3 * sigma
    grid = np.linspace(lo - pad, hi + pad, 1000)
    return grid, np.clip(broadened(nodes, weights, grid, sigma), 1e-12, None)


def _sets(arrays: dict) -> list[str]:
    return sorted({k.split("/")[0] for k in arrays if "/" in k})


# ---- one run ---------------------------------------------------------------------------------------


def _xlabel(meta: dict, kind: str) -> str:
    norm = meta.get("normalization", {}).get(kind, "")
    return {
        "unit": "step along the unit direction (Euclidean)",
        "weights": "step in units of ||θ||",
        "filter": "step in units of each filter's norm",
    }.get(norm, "step")


def draw_density(nodes, weights, path: Path, title: str = "", sigma: float | None = None) -> Path:
    """Log density against eigenvalue (as paper B draws it), the Gaussian broadening on the figure."""
    sigma = default_sigma(nodes) if sigma is None else sigma
    grid, dens = _density_curve(nodes, weights, sigma)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(grid, dens)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_title(f"Hessian eigenvalue density (SLQ){title}\nGaussian broadening σ = {sigma:.3g}", fontsize=9)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def draw_run(arrays: dict, meta: dict, path_prefix: Path) -> list[Path]:
    """The run's 1-D curves (loss and accuracy, ``<prefix>_1d.png``) and 2-D contours (``_2d.png``)."""
    out = []
    sets = _sets(arrays)
    lines = [s for s in sets if s.endswith("_1d")]
    if lines:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i, s in enumerate(lines):
            kind = s.split("_")[0]
            label = f"{kind} ({meta.get('normalization', {}).get(kind, '')})"
            axes[0].plot(arrays[f"{s}/coords0"], arrays[f"{s}/loss"], marker=".", color=f"C{i}", label=label)
            axes[1].plot(
                arrays[f"{s}/coords0"], arrays[f"{s}/accuracy"], marker=".", color=f"C{i}", label=label
            )
        axes[0].set_ylabel("loss")
        axes[1].set_ylabel("accuracy")
        for ax in axes:
            ax.set_xlabel("step along the direction (see legend for its normalization)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(_run_title(meta), fontsize=9)
        out.append(_save(fig, Path(f"{path_prefix}_1d.png")))
    planes = [s for s in sets if s.endswith("_2d")]
    if planes:
        fig, axes = plt.subplots(1, len(planes), figsize=(5.5 * len(planes), 4.6), squeeze=False)
        for ax, s in zip(axes[0], planes, strict=True):
            contour(ax, arrays, s, meta)
        fig.suptitle(_run_title(meta), fontsize=9)
        out.append(_save(fig, Path(f"{path_prefix}_2d.png")))
    return out


def contour(ax, arrays: dict, s: str, meta: dict, title: str | None = None) -> None:
    """Filled contours of the loss on the plane ``s`` (log-spaced levels), the origin marked."""
    a, b, loss = arrays[f"{s}/coords0"], arrays[f"{s}/coords1"], arrays[f"{s}/loss"]
    lo, hi = float(np.min(loss)), float(np.max(loss))
    levels = np.geomspace(max(lo, 1e-8), max(hi, lo * 1.0001, 1e-7), 15)
    cs = ax.contourf(
        a, b, loss.T, levels=levels, cmap="viridis", norm=matplotlib.colors.LogNorm(), extend="both"
    )
    ax.contour(a, b, loss.T, levels=levels, colors="white", linewidths=0.4, alpha=0.6)
    ax.plot([0], [0], marker="+", color="red", markersize=10)
    plt.colorbar(cs, ax=ax, label="loss (log scale)", format="%.3g")
    kind = s.split("_")[0]
    eig = arrays.get("eigenvalues")
    axis = ("v1", "v2") if kind == "eigen" else ("d1", "d2")
    if kind == "eigen" and eig is not None and len(eig) >= 2:
        axis = (f"v1 (λ1={eig[0]:.3g})", f"v2 (λ2={eig[1]:.3g})")
    ax.set_xlabel(f"{axis[0]}: {_xlabel(meta, kind)}", fontsize=8)
    ax.set_ylabel(f"{axis[1]}", fontsize=8)
    ax.set_title(title or TITLES.get(kind, kind).format(s="s"), fontsize=9)


def _run_title(meta: dict) -> str:
    import textwrap

    return textwrap.fill(
        f"{meta.get('run', '')}  {meta.get('checkpoint', '')}: loss on {meta.get('n_samples', '?')} "
        f"training samples, BatchNorm {meta.get('mode', '?')} mode",
        110,
    )


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- a sweep ---------------------------------------------------------------------------------------


def collect(good: pd.DataFrame, runs: list[dict]) -> pd.DataFrame:
    """One row per completed run with saved arrays: its series label, batch size, seed and files."""
    from reporting.figures import series

    dirs = {r["job"]: r["dir"] for r in runs}
    rows = []
    for label, part in series(good):
        for r in part.itertuples(index=False):
            d = dirs.get(r.job)
            if d is None:
                continue
            land, dens = newest(Path(d), LANDSCAPE_SUFFIX), newest(Path(d), DENSITY_SUFFIX)
            if land or dens:
                rows.append(
                    {"series": label, "batch_size": r.batch_size, "seed": r.seed, "job": r.job,
                     "landscape": land, "density": dens}
                )  # fmt: skip
    return pd.DataFrame(rows)


def _colors(batch_sizes) -> dict:
    sizes = sorted({b for b in batch_sizes if b is not None})
    cmap = plt.get_cmap("plasma")
    return {b: cmap(0.85 * i / max(len(sizes) - 1, 1)) for i, b in enumerate(sizes)}


def _panels(n: int, width: float = 5.0, height: float = 4.0):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, sharey=True)
    return fig, axes[0]


def figure_lines(found: pd.DataFrame, out: Path) -> list[Path]:
    """``landscape_1d_<kind>.png``: loss along each direction kind, a panel per series, colour = B."""
    loaded = {r.job: load_arrays(r.landscape) for r in found.itertuples() if r.landscape is not None}
    paths = []
    for kind in ("eigen", "random"):
        key = f"{kind}_1d"
        have = found[[r.job in loaded and f"{key}/loss" in loaded[r.job][0] for r in found.itertuples()]]
        if not len(have):
            continue
        colors = _colors(have["batch_size"])
        groups = list(have.groupby("series", sort=True))
        fig, axes = _panels(len(groups))
        norm = ""
        for ax, (label, part) in zip(axes, groups, strict=True):
            seen = set()
            for r in part.sort_values(["batch_size", "seed"]).itertuples():
                arrays, meta = loaded[r.job]
                norm = _xlabel(meta, kind)
                first = r.batch_size not in seen
                seen.add(r.batch_size)
                ax.plot(
                    arrays[f"{key}/coords0"], arrays[f"{key}/loss"], color=colors[r.batch_size], lw=1.4,
                    label=f"B={r.batch_size}" if first else None,
                )  # fmt: skip
            ax.set_title(label, fontsize=9)
            ax.set_xlabel(norm, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("training loss")
        axes[0].set_yscale("log")
        fig.suptitle(f"loss {TITLES[kind].format(s='')} (one line per run)", fontsize=10)
        paths.append(_save(fig, out / f"landscape_1d_{kind}.png"))
    return paths


def figure_densities(found: pd.DataFrame, out: Path) -> Path | None:
    """``density.png``: the SLQ densities, a panel per series, colour = B, one common broadening."""
    have = found[found["density"].notna()]
    if not len(have):
        return None
    loaded = {r.job: load_arrays(r.density)[0] for r in have.itertuples()}
    all_nodes = np.concatenate([a["nodes"].ravel() for a in loaded.values()])
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    sigma = default_sigma(all_nodes)
    colors = _colors(have["batch_size"])
    groups = list(have.groupby("series", sort=True))
    fig, axes = _panels(len(groups))
    for ax, (label, part) in zip(axes, groups, strict=True):
        seen = set()
        for r in part.sort_values(["batch_size", "seed"]).itertuples():
            grid, dens = _density_curve(loaded[r.job]["nodes"], loaded[r.job]["weights"], sigma, lo, hi)
            first = r.batch_size not in seen
            seen.add(r.batch_size)
            ax.semilogy(
                grid, dens, color=colors[r.batch_size], lw=1.2, label=f"B={r.batch_size}" if first else None
            )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("eigenvalue")
        ax.set_ylim(bottom=1e-6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("density (log)")
    fig.suptitle(
        f"Hessian eigenvalue density (SLQ)\nGaussian broadening σ = {sigma:.3g} (1% of the range of all runs)",
        fontsize=10,
    )
    return _save(fig, out / "density.png")


def figure_contours(
    found: pd.DataFrame, out: Path, chosen: list[str] | None = None, most: int = 12
) -> list[Path]:
    """``landscape_2d_<kind>.png``: a contour plot per run of a chosen set.

    ``chosen``: jobs whose name contains one of these strings; default: the first seed of each
    (series, batch size), at most ``most`` runs.
    """
    have = found[found["landscape"].notna()].sort_values(["series", "batch_size", "seed"])
    if chosen:
        have = have[[any(c in r.job for c in chosen) for r in have.itertuples()]]
    else:
        have = have.groupby(["series", "batch_size"], sort=False).head(1)
    have = have.head(most)
    loaded = {r.job: load_arrays(r.landscape) for r in have.itertuples()}
    paths = []
    for kind in ("eigen", "random"):
        key = f"{kind}_2d"
        part = have[[f"{key}/loss" in loaded[r.job][0] for r in have.itertuples()]]
        if not len(part):
            continue
        ncol = min(3, len(part))
        nrow = math.ceil(len(part) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 4.6 * nrow), squeeze=False)
        for ax, r in zip(axes.ravel(), part.itertuples(), strict=False):
            arrays, meta = loaded[r.job]
            contour(ax, arrays, key, meta, title=f"B={r.batch_size}, {r.series}, seed {r.seed}")
        for ax in axes.ravel()[len(part) :]:
            ax.axis("off")
        fig.suptitle(f"training loss {TITLES[kind].format(s='s')}", fontsize=10)
        paths.append(_save(fig, out / f"landscape_2d_{kind}.png"))
    return paths


def draw_sweep(
    good: pd.DataFrame, runs: list[dict], out: Path, chosen: list[str] | None = None
) -> list[Path]:
    """Every landscape and density figure of the sweep's completed runs that have saved arrays."""
    if not len(good):
        return []
    found = collect(good, runs)
    if not len(found):
        return []
    paths = figure_lines(found, out) + figure_contours(found, out, chosen)
    dens = figure_densities(found, out)
    return paths + ([dens] if dens else [])
