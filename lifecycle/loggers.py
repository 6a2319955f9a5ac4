"""The loggers of a job: the configured ones (CSV, W&B) plus the run record.

The CSV log of a resumed run is one log: it keeps the rows written up to the checkpoint the run
resumes from and appends the rest (Lightning's ``CSVLogger`` deletes the file when a run resumes
into the same folder). W&B never hangs a job: without credentials (and with ``WANDB_MODE`` unset) it runs offline and
says how to upload later; its run id is kept in the run directory, so a resumed job continues
the same W&B run (offline, where W&B cannot resume a run, the new segment replays the run's
earlier rows from the record and the CSV log, so its log holds the whole run); each job's run
gets its final summary from the record and is finished before the next job of a multirun starts
(:func:`finish_wandb`). What the run holds: :mod:`lifecycle.wandb_run`.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers import Logger
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from lifecycle import wandb_run
from lifecycle.record import FINISHED, RECORD, is_per_step, modify_record, plain, read_record, unconverged
from lifecycle.wandb_env import wandb_has_credentials, wandb_mode  # noqa: F401  (re-exported)
from lifecycle.wandb_run import EPOCH, History, apply
from lifecycle.world import is_global_zero


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` whose run reads the way the study is read (:mod:`lifecycle.wandb_run`).

    Per-epoch metrics (all but the per-step ones, :func:`lifecycle.record.is_per_step`, whichever
    module or callback logs them) go on an ``epoch`` axis; a setting or a count logged as a metric
    (:func:`lifecycle.wandb_run.could_be_constant`) goes to the summary instead of the history until
    it changes; the best accuracy and loss so far are kept as ``best/<name>``. At the end of the job
    :func:`finish_wandb` gives the run the record's final summary.

    Args:
        log_model: the job's checkpoints and record as an artifact at the end of the job
            (:func:`lifecycle.wandb_run.log_checkpoints`; not Lightning's own checkpoint logging).
        settings: the config's values by key (:func:`lifecycle.wandb_run.settings_of`), to tell
            settings among the logged values.
        replay: rows ``(metrics, step)`` logged before this process started (a resumed run), put
            through the same bookkeeping when the run starts; ``log_replay``: also written to the
            run (a new offline segment, or a run W&B has not seen), else only noted (an online run
            W&B resumes already holds them). Other arguments as Lightning's ``WandbLogger``.
    """

    def __init__(
        self, *args, log_model: bool = False, settings=None, replay=None, log_replay: bool = False, **kwargs
    ):
        super().__init__(*args, log_model=False, **kwargs)
        self.log_checkpoints = bool(log_model)
        self._history = History(settings)
        self._replay, self._log_replay = replay, log_replay
        self._axes_defined = False

    @property
    def experiment(self):
        run = super().experiment
        if rank_zero_only.rank == 0 and not self._axes_defined and getattr(run, "define_metric", None):
            self._axes_defined = True
            run.define_metric(EPOCH)
            rows, self._replay = self._replay or [], None
            for metrics, step in rows:
                update = self._history.add(metrics, step)
                if self._log_replay:
                    self._apply(update)
        return run

    def _apply(self, update) -> None:
        apply(self.experiment, update, lambda row, step: _LightningWandbLogger.log_metrics(self, row, step))

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        _ = self.experiment  # started (and any earlier rows replayed) before this row
        self._apply(self._history.add(metrics, step))

    @rank_zero_only
    def log_histogram(self, name: str, values, epoch: int, step: int) -> None:
        """Per-example values (e.g. each test example's top input-Hessian eigenvalue) as a W&B
        histogram on the ``epoch`` axis. Callbacks find this method by name on any logger, so they
        need not know W&B."""
        import wandb

        run = self.experiment
        run.define_metric(name, step_metric=EPOCH)
        run.log(
            {name: wandb.Histogram([float(v) for v in values]), EPOCH: epoch, "trainer/global_step": step}
        )


class RunRecord(Logger):
    """A Lightning logger that collects the per-epoch metrics into ``results.json``.

    Everything any module or callback logs reaches it through ``log_metrics``, on rank 0 only,
    also under ``ddp_spawn`` where callback objects in the launching process never see the
    workers' state. It rewrites the JSON file on every call (small; nothing lost on
    interruption), so a resumed run appends to the same history. A row holding a measurement that
    did not converge (:func:`lifecycle.record.unconverged`) is also listed under ``unconverged``.
    :meth:`annotate` takes run-level facts from callbacks (the stop reason).
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "run_record"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the job lifecycle writes the resolved config into the record itself

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: plain(v) for k, v in metrics.items() if not is_per_step(k)}
        if not row or set(row) <= {"epoch"}:
            return
        values = {k: v for k, v in row.items() if k != "epoch"}

        def append(record: dict) -> None:
            record.setdefault("history", []).append({"step": step, **row})
            record.setdefault("last", {}).update(values)
            record.setdefault("last_step", {}).update(dict.fromkeys(values, step))
            for prefix in unconverged(values):
                record.setdefault("unconverged", []).append(
                    {
                        "step": step,
                        "epoch": row.get("epoch"),
                        "prefix": prefix,
                        "rel_error": values.get(f"{prefix}/rel_error"),
                    }
                )
            segment = (record.get("segments") or [{}])[-1]
            if "started_unix" in segment:  # a heartbeat: a segment that dies keeps its time so far
                segment["wall_time_s"] = time.time() - segment["started_unix"]

        modify_record(self.path, append)

    @rank_zero_only
    def annotate(self, **fields) -> None:
        modify_record(self.path, lambda record: record.update(plain(fields)))


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` keeps its rows up to ``keep_until_step``."""

    def __init__(self, log_dir: str, keep_until_step: int):
        self.keep_until_step = keep_until_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [
                r
                for r in reader
                if r.get("step") not in (None, "") and float(r["step"]) <= self.keep_until_step
            ]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` whose file survives a resume (rows up to ``keep_until_step`` are kept).

    Args:
        keep_until_step: the step of the checkpoint the run resumes from; -1 (a fresh run) keeps
            nothing. Other arguments as Lightning's ``CSVLogger``.
    """

    def __init__(self, *args, keep_until_step: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_until_step = keep_until_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self.keep_until_step)
        return self._experiment


def build_loggers(cfg: DictConfig, out_dir: Path, keep_until_step: int = -1) -> list:
    """The configured loggers plus the run record (``results.json``).

    ``keep_until_step``: the step of the checkpoint a resumed run starts from (-1: a fresh run)."""
    loggers = []
    for lcfg in (cfg.get("logger") or {}).values():
        if lcfg is None:
            continue
        if lcfg._target_ == f"{__name__}.CSVLogger":
            loggers.append(hydra.utils.instantiate(lcfg, keep_until_step=keep_until_step))
        elif _is_wandb(lcfg):
            loggers.append(_wandb_logger(cfg, lcfg, out_dir, keep_until_step))
        else:
            loggers.append(hydra.utils.instantiate(lcfg))
    loggers.append(RunRecord(out_dir / RECORD))
    return loggers


def _is_wandb(lcfg) -> bool:
    return str(lcfg.get("_target_", "")).endswith("WandbLogger")


def _hydra_job() -> tuple[list[str], list[str]]:
    """This job's overrides and the keys that do not name a job (empty outside a Hydra run)."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return [], []
    return list(hc.overrides.task), list(hc.job.config.override_dirname.exclude_keys or [])


def _wandb_logger(cfg: DictConfig, lcfg: DictConfig, out_dir: Path, keep_until_step: int):
    """The job's W&B logger: its run id, group, tags, config, mode, and the rows a resumed run replays."""
    config = OmegaConf.to_container(cfg, resolve=True)
    overrides, exclude = _hydra_job()
    # Only rank 0 has a W&B run. Under torchrun or SLURM every rank builds this logger at the same
    # time: another rank must not write the id file (it could leave an id there that no run has),
    # nor read the run so far or print.
    rank_zero = is_global_zero()
    extra = {"id": wandb_run.run_id(out_dir) if rank_zero else None, "resume": "allow"}
    kwargs = wandb_run.init_kwargs(config, overrides, exclude)
    extra.update(config=kwargs["config"], settings=wandb_run.settings_of(kwargs["config"]))
    for key in ("group", "tags", "job_type"):  # an explicit logger.wandb.<key> wins
        if lcfg.get(key) is None:
            extra[key] = kwargs[key]
    offline = bool(lcfg.get("offline")) or wandb_run.offline_mode()
    if wandb_mode() == "offline":
        extra["mode"] = "offline"  # per run: does not leak into later jobs like offline=True does
        offline = True
        if rank_zero:
            print(
                f"[train] W&B: no credentials found, logging offline. Upload later with:\n"
                f"    wandb sync {out_dir / 'wandb' / 'latest-run'}"
            )
    if keep_until_step >= 0 and rank_zero:  # a resumed run: what W&B must hold of the run so far
        rows = wandb_run.job_rows(out_dir, read_record(out_dir / RECORD), before_step=keep_until_step)
        seen = any((out_dir / "wandb").glob(f"*run-*-{extra['id']}"))
        # an offline segment starts a new log (W&B cannot resume offline runs): it holds the earlier rows too
        extra.update(replay=rows, log_replay=offline or not seen)
        if offline and rows:
            print(
                f"[train] W&B offline: this segment replays the {len(rows)} earlier rows of the run, so "
                f"its log holds the whole run: sync only {out_dir / 'wandb' / 'latest-run'}"
            )
    return hydra.utils.instantiate(lcfg, _partial_=True)(**extra)


def finish_wandb(out_dir: str | os.PathLike | None = None) -> None:
    """End this job's W&B run, so the next job of a multirun gets its own.

    With ``out_dir`` (the job directory), the run first gets its summary from the job's record
    (final values, status, stop reason, ...: :func:`lifecycle.wandb_run.summary_of`), and the
    checkpoints if ``logger.wandb.log_model`` asks for them; its exit code says whether the job
    finished (completed or diverged). Nothing happens without a live run.
    """
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    record, exit_code = None, 0
    if out_dir is not None:
        try:
            record = wandb_run.publish(run, Path(out_dir))
            exit_code = 0 if record.get("status") in FINISHED else 1
        except Exception as e:  # never lose the run (or the job's exit status) to its summary
            print(f"[train] W&B: the final summary was not sent ({type(e).__name__}: {e})", file=sys.stderr)
    wandb.finish(exit_code=exit_code)
    if record is not None:
        wandb_run.mark_sent(Path(out_dir), record, run)


def send_finished(cfg: DictConfig, out_dir: Path) -> None:
    """A finished job re-run with a W&B logger: its record goes to W&B as the job's run
    (:func:`lifecycle.wandb_run.send`), unless that run already holds it (then this says so)."""
    wandb_cfg = next(
        (lcfg for lcfg in (cfg.get("logger") or {}).values() if lcfg is not None and _is_wandb(lcfg)), None
    )
    if wandb_cfg is None:
        return
    try:
        outcome, message = wandb_run.send(Path(out_dir), project=wandb_cfg.get("project"), mode=wandb_mode())
    except Exception as e:  # the job's result stands; only W&B did not get it
        outcome, message = (
            "not sent",
            f"{type(e).__name__}: {e} (python wandb_sync.py {out_dir} sends it later)",
        )
    print(f"[train] W&B: {outcome}: {message}")
    if outcome == "sent" and (wandb_mode() == "offline" or wandb_run.offline_mode()):
        print(
            "[train] W&B: written offline. Upload later with:\n"
            f"    wandb sync {Path(out_dir) / 'wandb' / 'latest-run'}"
        )
