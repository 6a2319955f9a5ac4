"""What a job's W&B run holds, whether it is logged live or sent later from the job's record.

One definition serves the live logger (:class:`lifecycle.loggers.WandbLogger`), the replay of a
resumed offline run, and the backfill command (``wandb_sync.py``), so a run looks the same on
W&B whichever way it got there:

- **history** (:class:`History`): every per-epoch metric (all but the per-step ones,
  :func:`lifecycle.record.is_per_step`, whichever module or callback logs them) on the ``epoch``
  axis; per-step values (``train/loss_step``) on Lightning's step axis. Constants are derived, not
  listed: a per-epoch value that is a setting or a count (:func:`could_be_constant`: a whole
  number >= 2 such as ``opt/batch_size`` or ``adv/n_samples``, or the value of the config key its
  name ends with, such as ``opt/momentum``) goes to the summary, not the history, for as long as
  it does not change; if it changes (a scheduled lr) it is charted, its earlier epochs included;
- **summary** (:func:`summary_of`): the record's ``final`` as plain numbers under their logged
  names (non-finite ones as the record writes them: ``"nan"``, ``"inf"``), the run's ``status``, ``stop_reason``, ``reached_target``, ``epochs``, ``steps``,
  ``wall_time_s`` and ``time/<part>`` (the record's ``time_split``), ``segments``, ``error``, ``data_on_device``,
  ``unconverged`` (the prefixes of measurements that missed their stop, comma-separated; only
  when there are some: each row's ``<prefix>/converged`` stays in the history), and
  the best value of every accuracy and loss so far as ``best/<name>`` (epoch in
  ``best_epoch/<name>``);
- **grouping** (:func:`init_kwargs`): one W&B group per grid point (:func:`group_of`: the
  experiment name and the job's overrides without ``seed``), the experiment name as a tag,
  job type ``train``, the resolved config plus ``effective_lr`` as the run's config;
- **checkpoints** (:func:`log_checkpoints`): ``checkpoints/*.ckpt`` and ``results.json`` as one
  artifact ``model-<run id>``, when ``logger.wandb.log_model`` is true;
- **what was sent** (:func:`mark_sent`, :func:`already_sent`): ``wandb/sent.json`` in the job
  directory holds a digest of what the run was given, so the backfill sends a run only once.

W&B itself is imported only by the functions that talk to a run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lifecycle import sweep
from lifecycle.identity import NOT_TRAINING
from lifecycle.record import FINISHED, RECORD, is_per_step, reached_target, read_record, unconverged
from lightning_modules.config import effective_lr

EPOCH = "epoch"
STEP = "trainer/global_step"  # Lightning's WandbLogger logs every row with it
JOB_TYPE = "train"
ID_FILE = "wandb_id.txt"
SENT = "sent.json"  # in <job>/wandb/
MAX_GROUP = 128  # W&B's limit on a group name
ROOT = Path(__file__).resolve().parents[1]


# ---- values -----------------------------------------------------------------------------------
def number(v: Any) -> float:
    """A logged value as a plain float (tensors, ints, and the record's "nan"/"inf" strings)."""
    if hasattr(v, "item"):
        v = v.item()
    return float(v)


def summary_value(v: Any) -> float | str:
    """A value for the run summary: a plain number, or the record's ``"nan"``/``"inf"``/``"-inf"``
    (W&B drops a NaN from the summary and would write infinity as ``"Infinity"``)."""
    f = number(v)
    return f if math.isfinite(f) else str(f)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _best_direction(name: str) -> str | None:
    """``max`` for an accuracy, ``min`` for a loss (``<set>/acc``, ``<set>/loss``); gaps have no best."""
    prefix, _, leaf = name.rpartition("/")
    if not prefix or prefix.startswith("gen_gap"):
        return None
    return {"acc": "max", "loss": "min"}.get(leaf)


def settings_of(config: Mapping) -> dict[str, list[float]]:
    """The numeric values of a config by their key's last part (``{"momentum": [0.9], ...}``)."""
    out: dict[str, list[float]] = {}

    def walk(node, key):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, int | float) and not isinstance(node, bool) and math.isfinite(node):
            out.setdefault(key, []).append(float(node))

    walk(config, "")
    return out


def could_be_constant(name: str, value: float, settings: Mapping[str, Sequence[float]]) -> bool:
    """Whether a per-epoch value may be a setting or a count rather than a measurement: a whole
    number of at least 2 (a size, a sample count: ``opt/batch_size``, ``adv/n_samples``), or the
    value of a config key named like the metric's last part, or ending in ``_<last part>``
    (``opt/momentum`` = ``optimizer.momentum``, ``opt/lr`` = ``effective_lr``; to float32 precision)."""
    if math.isfinite(value) and value.is_integer() and abs(value) >= 2:
        return True
    leaf = name.rpartition("/")[2]
    return any(
        math.isclose(value, v, rel_tol=1e-6)
        for key, values in settings.items()
        if key == leaf or key.endswith("_" + leaf)
        for v in values
    )


# ---- history ------------------------------------------------------------------------------------
@dataclass
class Update:
    """What one logging call turns into: metrics to put on the epoch axis, rows, summary values."""

    define: list[str] = field(default_factory=list)
    rows: list[tuple[dict, int | None]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class History:
    """Decides, call by call, what of a job's logged rows goes into W&B's history and what into the summary.

    A per-epoch metric is charted on the ``epoch`` axis from its first value on, unless that value
    :func:`could_be_constant`: then it is held back (summary only) for as long as it does not
    change; the first time it changes it is charted, its earlier epochs included (a scheduled lr).
    Pure bookkeeping (no W&B): :meth:`add` takes what Lightning hands a logger (``metrics`` with
    ``epoch``, and ``step``) and returns an :class:`Update` to apply to a run (:func:`apply`).

    Args:
        settings: :func:`settings_of` the job's config.
    """

    def __init__(self, settings: Mapping[str, Sequence[float]] | None = None) -> None:
        self.settings = dict(settings or {})
        self.charted: set[str] = set()
        self.held: dict[str, list[tuple[Any, int | None, float]]] = {}  # name -> [(epoch, step, value)]
        self.best: dict[str, tuple[float, Any]] = {}  # name -> (value, epoch)

    def add(self, metrics: Mapping[str, Any], step: int | None) -> Update:
        out = Update()
        epoch = metrics.get(EPOCH)
        row: dict[str, Any] = {}
        backlog: dict[tuple[int, Any], dict[str, float]] = {}
        for name, raw in metrics.items():
            if name == EPOCH:
                continue
            if is_per_step(name):
                row[name] = raw
                continue
            v = number(raw)
            self._track_best(name, v, epoch, out.summary)
            if name in self.charted:
                row[name] = v
            elif name in self.held and _same(v, self.held[name][0][2]):
                self.held[name].append((epoch, step, v))
            elif name not in self.held and could_be_constant(name, v, self.settings):
                self.held[name] = [(epoch, step, v)]
                out.summary[name] = v
            else:  # a measurement, or a held value that changed: charted from its first epoch on
                out.define.append(name)
                for e, s, old in self.held.pop(name, []):
                    backlog.setdefault((-1 if s is None else s, e), {})[name] = old
                self.charted.add(name)
                row[name] = v
        for (s, e), values in sorted(backlog.items(), key=lambda item: item[0][0]):
            out.rows.append(({**values, EPOCH: e} if e is not None else values, None if s < 0 else s))
        if row:
            out.rows.append(({**row, EPOCH: epoch} if epoch is not None else row, step))
        return out

    def _track_best(self, name: str, v: float, epoch: Any, summary: dict) -> None:
        direction = _best_direction(name)
        if direction is None or math.isnan(v):
            return
        old = self.best.get(name)
        if old is None or (v > old[0] if direction == "max" else v < old[0]):
            self.best[name] = (v, epoch)
            summary[f"best/{name}"] = v
            if epoch is not None:
                summary[f"best_epoch/{name}"] = number(epoch)

    def constants(self) -> dict[str, float]:
        """The per-epoch values held back as constants so far: ``{name: value}``."""
        return {name: values[0][2] for name, values in self.held.items()}

    def best_summary(self) -> dict[str, float]:
        out = {}
        for name, (v, epoch) in self.best.items():
            out[f"best/{name}"] = v
            if epoch is not None:
                out[f"best_epoch/{name}"] = number(epoch)
        return out


def apply(run, update: Update, log) -> None:
    """Apply an :class:`Update` to a W&B ``run``; ``log(row, step)`` writes one history row."""
    for name in update.define:
        run.define_metric(name, step_metric=EPOCH)
    for row, step in update.rows:
        log(row, step)
    if update.summary:
        run.summary.update(update.summary)


def define_axes(run) -> None:
    """The axes Lightning's ``WandbLogger`` defines, and ``epoch``."""
    run.define_metric(STEP)
    run.define_metric("*", step_metric=STEP, step_sync=True)
    run.define_metric(EPOCH)


# ---- rows from the record and the CSV log -------------------------------------------------------
def record_rows(record: Mapping, before_step: int | None = None) -> list[tuple[dict, int | None]]:
    """The record's history as ``(metrics with epoch, step)``; ``before_step``: only rows logged before it.

    Steps follow Lightning's convention (a row logged after ``s`` optimizer steps has step
    ``s - 1``), so the rows a checkpoint at step ``s`` has seen are those with ``step < s``.
    """
    rows = []
    for r in record.get("history") or []:
        step = r.get("step")
        if before_step is not None and (step is None or step >= before_step):
            continue
        rows.append(({k: v for k, v in r.items() if k != "step"}, step))
    return rows


def csv_step_rows(job_dir: Path, before_step: int | None = None) -> list[tuple[dict, int | None]]:
    """The per-step values (``*_step``) of the job's CSV log, if it has one, as ``(metrics, step)``."""
    files = sorted(Path(job_dir).glob("csv/*/metrics.csv"))
    if not files:
        return []
    rows = []
    with open(files[-1], newline="") as f:
        for r in csv.DictReader(f):
            values = {k: float(v) for k, v in r.items() if k and is_per_step(k) and v not in (None, "")}
            if not values or r.get("step") in (None, ""):
                continue
            step = int(float(r["step"]))
            if before_step is not None and step >= before_step:
                continue
            if r.get(EPOCH) not in (None, ""):
                values[EPOCH] = float(r[EPOCH])
            rows.append((values, step))
    return rows


def job_rows(job_dir: Path, record: Mapping, before_step: int | None = None) -> list[tuple[dict, int | None]]:
    """The job's logged rows in logging order: the record's per-epoch rows and the CSV's per-step rows."""
    rows = [(r, s, 0) for r, s in csv_step_rows(job_dir, before_step)]
    rows += [(r, s, 1) for r, s in record_rows(record, before_step)]
    rows.sort(key=lambda r: (-1 if r[1] is None else r[1], r[2]))  # a step's batch row before its epoch rows
    return [(r, s) for r, s, _ in rows]


# ---- summary ------------------------------------------------------------------------------------
def summary_of(record: Mapping) -> dict[str, Any]:
    """The run summary a job's record gives (see the module docstring); plain values only."""
    values = record.get("final") or record.get("last") or {}
    out: dict[str, Any] = {k: summary_value(v) for k, v in values.items()}
    history = History()
    for row, step in record_rows(record):
        history.add(row, step)
    out.update(history.best_summary())
    reason = record.get("stop_reason")
    facts = {
        "status": record.get("status"),
        "stop_reason": reason,
        "reached_target": reached_target(record),
        "epochs": record.get("stopped_at_epoch"),
        "steps": record.get("stopped_at_step"),
        "wall_time_s": record.get("wall_time_s"),
        "segments": len(record.get("segments") or []) or None,
        "error": record.get("error"),
        "data_on_device": record.get("data_on_device"),
    }
    out.update({k: v for k, v in facts.items() if v is not None})
    for part, seconds in (record.get("time_split") or {}).items():
        out[f"time/{part}"] = summary_value(seconds)
    flagged = {row.get("prefix") for row in record.get("unconverged") or [] if row.get("prefix")}
    if flagged := flagged | set(unconverged(record.get("final") or {})):  # at any row, or in final
        out["unconverged"] = ",".join(sorted(flagged))
    return out


# ---- grouping and config ------------------------------------------------------------------------
def group_of(experiment: str, overrides: Sequence[str], exclude: Iterable[str] = ()) -> str:
    """The W&B group of a job: ``<experiment>/<its overrides without seed>``, so a group is the seeds
    of one grid point. Keys in ``exclude`` (Hydra's ``override_dirname.exclude_keys``) and those that
    do not change what is trained (:data:`lifecycle.identity.NOT_TRAINING`: loggers, paths, threads,
    ...) are left out, with their subkeys, and so is ``experiment=<experiment>``, already in the
    name. Over 128 characters (W&B's limit): shortened, with a hash of the whole name."""
    skip = (*exclude, *NOT_TRAINING)
    kept = []
    for o in sweep.parse(overrides):
        key = o.key_or_group
        if key == "seed" or any(key == k or key.startswith(k + ".") for k in skip):
            continue
        if key == "experiment" and str(o.value()) == str(experiment):
            continue
        kept.append(o.input_line)
    name = f"{experiment}/{sweep.describe(kept)}" if kept else str(experiment)
    if len(name) > MAX_GROUP:
        name = name[: MAX_GROUP - 11] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def config_of(config: Mapping) -> dict:
    """The run's W&B config: the resolved job config and ``effective_lr`` (the lr SGD used)."""
    opt = config.get("optimizer") or {}
    lr = effective_lr(opt.get("lr_rule"), opt.get("lr"), opt.get("lr_ratio"), opt.get("batch_size"))
    return {**config, "effective_lr": lr}


def init_kwargs(config: Mapping, overrides: Sequence[str], exclude: Iterable[str]) -> dict:
    """``group``, ``tags``, ``job_type`` and ``config`` of a job's ``wandb.init``."""
    experiment = str(config.get("experiment_name", "adhoc"))
    return {
        "group": group_of(experiment, overrides, exclude),
        "tags": [experiment],
        "job_type": JOB_TYPE,
        "config": config_of(config),
    }


def default_exclude_keys() -> list[str]:
    """The keys that do not name a job (``hydra.job.config.override_dirname.exclude_keys``)."""
    cfg = OmegaConf.load(ROOT / "conf" / "hydra" / "default.yaml")
    return list(cfg.job.config.override_dirname.exclude_keys)


def job_exclude_keys(job_dir: Path) -> list[str]:
    """The exclude keys the job was run with (its ``.hydra/hydra.yaml``), else the project's default."""
    path = Path(job_dir) / ".hydra" / "hydra.yaml"
    if path.is_file():
        try:
            keys = OmegaConf.load(path).hydra.job.config.override_dirname.exclude_keys
            return list(keys or [])
        except Exception:
            pass
    return default_exclude_keys()


def run_id(job_dir: Path) -> str:
    """The job's W&B run id, kept in ``wandb_id.txt`` (created on first use): every segment and the
    backfill use the same run."""
    path = Path(job_dir) / ID_FILE
    if not path.exists():
        path.write_text(hashlib.sha1(f"{Path(job_dir).resolve()}{time.time()}".encode()).hexdigest()[:16])
    return path.read_text().strip()


# ---- what was sent ------------------------------------------------------------------------------
def digest(record: Mapping) -> str:
    """A digest of what the job's run is given from ``record`` (summary, history, config, overrides)."""
    payload = {
        "summary": summary_of(record),
        "history": record.get("history"),
        "config": record.get("config"),
        "overrides": record.get("overrides"),
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def mark_sent(job_dir: Path, record: Mapping, run) -> None:
    """Note in ``<job>/wandb/sent.json`` that ``run`` was given this record (a disabled run sends nothing)."""
    mode = getattr(getattr(run, "settings", None), "mode", None)
    if mode == "disabled" or getattr(run, "disabled", False):
        return
    path = Path(job_dir) / "wandb" / SENT
    path.parent.mkdir(parents=True, exist_ok=True)
    run_dir = str(Path(run.dir).parent) if getattr(run, "dir", None) else None
    at = time.strftime("%Y-%m-%dT%H:%M:%S")
    sent = {"run_id": run.id, "digest": digest(record), "status": record.get("status"), "mode": mode}
    path.write_text(json.dumps({**sent, "run_dir": run_dir, "at": at}, indent=1))


def already_sent(job_dir: Path, record: Mapping) -> dict | None:
    """The ``sent.json`` of the job if its run was already given exactly this record, else None."""
    path = Path(job_dir) / "wandb" / SENT
    try:
        sent = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return sent if sent.get("digest") == digest(record) else None


# ---- talking to a run -----------------------------------------------------------------------------
def log_checkpoints(run, job_dir: Path, record: Mapping) -> None:
    """The job's checkpoints and its record as one artifact ``model-<run id>`` (aliases: latest, status)."""
    import wandb

    files = sorted(Path(job_dir).glob("checkpoints/*.ckpt"))
    if not files:
        return
    summary = {k: v for k, v in summary_of(record).items() if isinstance(v, int | float | str | bool)}
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=summary)
    for f in files:
        artifact.add_file(str(f), name=f"checkpoints/{f.name}")
    artifact.add_file(str(Path(job_dir) / RECORD), name=RECORD)
    run.log_artifact(artifact, aliases=["latest", str(record.get("status"))])


def wants_checkpoints(record: Mapping) -> bool:
    """Whether the job's config asks for its checkpoints as artifacts (``logger.wandb.log_model``)."""
    wandb_cfg = ((record.get("config") or {}).get("logger") or {}).get("wandb") or {}
    return bool(wandb_cfg.get("log_model"))


def publish(run, job_dir: Path) -> dict:
    """Give the live ``run`` its final summary from the job's record, and the checkpoints if the job's
    config asks for them; returns the record."""
    record = read_record(Path(job_dir) / RECORD)
    run.summary.update(summary_of(record))
    if wants_checkpoints(record) and record.get("status") in FINISHED:
        log_checkpoints(run, job_dir, record)
    return record


def send(
    job_dir: Path,
    *,
    project: str | None = None,
    mode: str | None = None,
    log_model: bool | None = None,
    force: bool = False,
) -> tuple[str, str]:
    """Send a finished job to W&B from its record and logs (the backfill); returns ``(outcome, message)``.

    ``outcome`` is ``sent``, ``skipped`` (already sent with this very record, or not finished).
    One W&B run per job, with the job's run id (``wandb_id.txt``); history, summary, group and config
    as a live run has them. ``log_model``: also the checkpoints (None: as the job's config says).
    """
    import wandb

    job_dir = Path(job_dir)
    record = read_record(job_dir / RECORD)
    if (mode or os.environ.get("WANDB_MODE", "")).lower() == "disabled":
        return "skipped", "W&B is disabled (WANDB_MODE=disabled)"
    if record.get("status") not in FINISHED:
        return "skipped", f"not finished (status {record.get('status')})"
    if not force and (sent := already_sent(job_dir, record)):
        return "skipped", f"already sent as run {sent['run_id']} ({sent.get('run_dir') or sent.get('mode')})"
    config = record.get("config") or {}
    wandb_cfg = (config.get("logger") or {}).get("wandb") or {}
    kwargs = init_kwargs(config, record.get("overrides") or [], job_exclude_keys(job_dir))
    run = wandb.init(
        id=run_id(job_dir),
        resume="allow",
        project=project or wandb_cfg.get("project") or "sgd-curvature",
        name=job_dir.name,
        dir=str(job_dir),
        mode=mode,
        **kwargs,
    )
    try:
        define_axes(run)
        history = History(settings_of(kwargs["config"]))

        def log(row, step):
            run.log(row if step is None else {**row, STEP: step})

        for row, step in job_rows(job_dir, record):
            apply(run, history.add(row, step), log)
        run.summary.update(summary_of(record))
        if log_model if log_model is not None else wants_checkpoints(record):
            log_checkpoints(run, job_dir, record)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    mark_sent(job_dir, record, run)
    where = Path(run.dir).parent if getattr(run, "dir", None) else None
    return "sent", f"run {run.id}, group {kwargs['group']}" + (f" ({where})" if where else "")


def job_dirs(path: Path) -> list[Path]:
    """Every job directory (one holding ``results.json``) at or under ``path``."""
    path = Path(path)
    if (path / RECORD).is_file():
        return [path]
    return sorted(p.parent for p in path.rglob(RECORD) if "wandb" not in p.relative_to(path).parts)


def offline_mode() -> bool:
    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
