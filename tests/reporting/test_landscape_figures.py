"""The report's landscape and density figures, from arrays saved beside each run of a synthetic
sweep (fixed lr, natural and adversarial training, B = 32, 128, 512): one panel per training, a
colour per batch size, the same curves as the arrays; contours for a chosen set of runs."""

from __future__ import annotations

import numpy as np

from reporting import landscape, pipeline
from tests.test_report import record, write

SIZES = (32, 128, 512)


def curvature(b: int, adversarial: bool) -> float:
    """Paper B's picture, made up: sharper with the batch size, flatter with robust training."""
    return b / 8 / (4 if adversarial else 1)


def synthetic_sweep(tmp_path):
    recs = [record(b, 0, curvature(b, adv), 0.95, adversarial=adv) for adv in (False, True) for b in SIZES]
    sweep = write(tmp_path / "sweep", recs)
    a = np.linspace(-0.5, 0.5, 11)
    for i, r in enumerate(recs):
        lam = r["final"]["hessian/lambda_1"]
        adv = r["config"]["adversarial_training"]["enabled"]
        arrays = {"eigenvalues": np.array([lam, lam / 2])}
        for kind, k1 in (("eigen", lam), ("random", lam / 10)):
            arrays[f"{kind}_1d/coords0"] = a
            arrays[f"{kind}_1d/loss"] = 0.01 + k1 / 2 * a**2
            arrays[f"{kind}_1d/accuracy"] = np.exp(-(a**2))
            arrays[f"{kind}_2d/coords0"] = arrays[f"{kind}_2d/coords1"] = a
            arrays[f"{kind}_2d/loss"] = 0.01 + k1 / 2 * a[:, None] ** 2 + k1 / 4 * a[None] ** 2
            arrays[f"{kind}_2d/accuracy"] = np.ones((11, 11))
        meta = {"mode": "eval", "n_samples": 1000, "normalization": {"eigen": "unit", "random": "filter"}}
        landscape.save_arrays(sweep / f"{i}" / "measurements" / "last-abc_landscape.npz", arrays, meta)
        nodes = np.array([[0.0, lam / 3, lam]])
        landscape.save_arrays(
            sweep / f"{i}" / "measurements" / "last-abc_density.npz",
            {"nodes": nodes, "weights": np.array([[0.9, 0.09, 0.01]])},
            {"adversarial": adv},
        )
    return sweep


def test_the_report_draws_curves_densities_and_contours_per_training_and_batch_size(tmp_path, monkeypatch):
    out = tmp_path / "out"
    drawn = {}
    real_save = landscape._save

    def keep(fig, path):  # inspect the figures before they are closed
        drawn[path.name] = [
            (ax.get_title(), [(line.get_label(), line.get_xdata(), line.get_ydata()) for line in ax.lines])
            for ax in fig.axes
        ]
        drawn[path.name + ":suptitle"] = fig._suptitle.get_text() if fig._suptitle else ""
        return real_save(fig, path)

    monkeypatch.setattr(landscape, "_save", keep)
    pipeline.report(synthetic_sweep(tmp_path), out, contour_runs=["0", "5"])
    for name in ("landscape_1d_eigen.png", "landscape_1d_random.png", "density.png", "landscape_2d_eigen.png",
                 "landscape_2d_random.png"):  # fmt: skip
        assert (out / name).stat().st_size > 10_000, name

    panels = drawn["landscape_1d_eigen.png"]
    assert [title for title, _ in panels] == ["training=adversarial", "training=natural"]
    for title, lines in panels:
        adv = title.endswith("adversarial")
        assert [label for label, _, _ in lines] == [f"B={b}" for b in SIZES]
        for (_, x, y), b in zip(lines, SIZES, strict=True):  # the saved curve, unchanged
            assert np.allclose(y, 0.01 + curvature(b, adv) / 2 * x**2)
    density = drawn["density.png"]
    assert "Gaussian broadening σ = " in drawn["density.png:suptitle"]
    assert [label for label, _, _ in density[0][1]] == [f"B={b}" for b in SIZES]
    # contours: only the chosen runs ("0" and "5": natural B=32, adversarial B=512)
    titles = [t for t, _ in drawn["landscape_2d_eigen.png"] if t]
    assert any("B=32" in t and "natural" in t for t in titles)
    assert any("B=512" in t and "adversarial" in t for t in titles)
    assert not any("B=128" in t for t in titles)


def test_a_sweep_without_arrays_draws_no_landscape(tmp_path):
    sweep = write(tmp_path / "sweep", [record(b, 0, 10.0, 0.95) for b in SIZES])
    pipeline.report(sweep, tmp_path / "out")
    assert (
        not list((tmp_path / "out").glob("landscape*.png"))
        and not (tmp_path / "out" / "density.png").exists()
    )


def test_draw_density_states_the_broadening_and_is_log_scaled(tmp_path):
    path = landscape.draw_density(
        np.array([[0.0, 1.0, 5.0]]), np.array([[0.8, 0.15, 0.05]]), tmp_path / "d.png"
    )
    assert path.stat().st_size > 5_000
    grid = np.linspace(-10, 15, 5001)
    mass = landscape.broadened(np.array([[0.0, 1.0, 5.0]]), np.array([[0.8, 0.15, 0.05]]), grid, 0.05)
    assert abs(mass.sum() * (grid[1] - grid[0]) - 1) < 1e-6  # a density: integrates to 1


def test_the_landscape_figures_reach_the_reports_wandb_run_as_images(tmp_path, monkeypatch):
    """``report.py --wandb`` (offline): every landscape and density PNG is in the run, read back with
    W&B's own reader (the history rows name each image)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import report

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sweep = synthetic_sweep(tmp_path)
    assert report.main([str(sweep), "--wandb"]) == 0
    (log,) = (sweep / "report" / "wandb").glob("offline-run-*/run-*.wandb")
    wandb_cli = shutil.which("wandb", path=os.path.dirname(sys.executable)) or "wandb"
    out = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(log)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    images = set()
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        if rec.get("type") == "history":
            images |= {k.split(".")[0] for k, v in rec["history"]["item"].items() if v == "image-file"}
    expected = {
        "landscape_1d_eigen",
        "landscape_1d_random",
        "landscape_2d_eigen",
        "landscape_2d_random",
        "density",
    }
    assert {f"figures/{name}" for name in expected} <= images, images
