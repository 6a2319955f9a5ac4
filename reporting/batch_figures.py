"""The adaptive batch's schedule (ABS / ABSA / noise scale): batch size and lr against epoch.

Drawn for the completed runs whose history logged ``abs/batch_size`` (:class:`callbacks.adaptive_batch.
AdaptiveBatch`): one colour per arm (``batch_policy``, :func:`reporting.runs.batch_policy`), one
thin line per seed; the batch on a log-2 axis.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from reporting.runs import ARMS, batch_policy, num  # noqa: E402

KEYS = (("abs/batch_size", "batch size (global)"), ("abs/lr", "effective lr"))


def schedule(run: dict) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (epochs, values)}`` of :data:`KEYS` from a record's per-epoch history (the last row
    of an epoch wins)."""
    by_epoch: dict[int, dict] = {}
    for row in run.get("history") or []:
        epoch = num(row.get("epoch"))
        if math.isfinite(epoch):
            by_epoch.setdefault(int(epoch), {}).update(row)
    out = {}
    for key, _ in KEYS:
        pts = [(e, num(by_epoch[e][key])) for e in sorted(by_epoch) if key in by_epoch[e]]
        pts = [(e, v) for e, v in pts if math.isfinite(v)]
        if pts:
            out[key] = ([e for e, _ in pts], [v for _, v in pts])
    return out


def figure_batch_schedule(runs: list[dict], out: Path) -> bool:
    """``batch_schedule.png``; False (nothing drawn) when no completed run logged ``abs/batch_size``."""
    drawn = [
        (r, s) for r in runs if r.get("status") == "completed" and "abs/batch_size" in (s := schedule(r))
    ]
    if not drawn:
        return False
    arms = sorted({batch_policy(r) for r, _ in drawn}, key=lambda a: (ARMS + (a,)).index(a))
    colors = {a: f"C{i % 10}" for i, a in enumerate(arms)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labelled: set[str] = set()
    for r, s in sorted(drawn, key=lambda rs: str(rs[0].get("job"))):
        arm = batch_policy(r)
        for ax, (key, _) in zip(axes, KEYS, strict=True):
            if key in s:
                ax.plot(*s[key], lw=1, marker=".", ms=4, alpha=0.8, color=colors[arm],
                        label=None if arm in labelled else arm)  # fmt: skip
        labelled.add(arm)
    for ax, (_, name) in zip(axes, KEYS, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log", base=2)
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[0].set_title("batch size (one line per seed)")
    axes[1].set_title("learning rate at each epoch's start")
    axes[0].legend(fontsize=8, title="arm")
    fig.tight_layout()
    path = out / "batch_schedule.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
