"""One job's lifecycle: check and build, then train fresh, resume, or report a finished job.

Every way a job ends is recorded in ``results.json`` (:mod:`lifecycle.record`):

==============  ==========================================================  ===========
status          when                                                        exit status
==============  ==========================================================  ===========
``running``     training (or a process that died without a word: SIGKILL)  --
``completed``   training stopped by its target, epoch cap or step budget    0
``diverged``    the training loss became non-finite                         0
``failed``      a bad config value (before training; nothing trained)       2
``failed``      an exception during the job (type, message, traceback)      1
``interrupted`` SIGINT (Ctrl-C) or SIGTERM (schedulers' preemption)         130 / 143
==============  ==========================================================  ===========

A re-run of the same command resumes a job that is not finished from ``checkpoints/last.ckpt``
(one run: the history keeps each epoch once, the wall time adds up) and refuses to report or
resume a job whose training config, measurement settings or code changed
(:mod:`lifecycle.identity`). Only one process runs a job at a time: a lock file in the run
directory is held while the job runs and released by the kernel when its process dies. A job
directory outside ``paths.log_dir`` is refused before anything is written into it
(:class:`lifecycle.rundir.RunDirGuard`, before Hydra creates it), and ``.hydra/`` is written by
the job once it holds the lock and starts training, so a refused launch changes nothing.

:func:`run_job` returns a :class:`JobOutcome` and never exits (a signal aside): the entry point
(``train.py``) turns outcomes into the exit status, so a multirun goes on after a failed job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from callbacks.fault_injection import FaultInjection
from lifecycle import sweep
from lifecycle.build import Job, build_job
from lifecycle.guards import (
    SIGNAL_EXIT,
    Interrupted,
    JobRefused,
    check_identity,
    checkpoint_step,
    job_lock,
    signals_recorded,
)
from lifecycle.identity import identity, provenance
from lifecycle.loggers import build_loggers, finish_wandb, send_finished
from lifecycle.record import (
    FINISHED,
    RECORD,
    RecordError,
    read_record,
    time_split,
    truncate_history,
    update_record,
)
from lifecycle.rundir import RunDirError, check_inside
from lifecycle.summary import summarize
from lifecycle.world import check_rank, check_world, describe_process, is_global_zero, world_of
from lightning_modules.config import ConfigError
from lightning_modules.data import DataUnavailable
from lightning_modules.models import has_batchnorm

EXIT_FAILED, EXIT_REFUSED = 1, 2


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _cause(e: Exception) -> str:
    """The error behind Hydra's instantiation wrapper, as ``Type: message``."""
    cause = e.__cause__ or e
    return f"{type(cause).__name__}: {cause}"


def _start_segment(record_path, cfg, now, plan, resume, segment, accepted, start) -> None:
    """Open this process's segment of the run: the record says ``running`` with its header.

    ``segment``: the step it starts from and the processes it runs on, as Lightning found them
    (:func:`lifecycle.world.world_of`). Rows logged after the checkpoint it resumes from are
    dropped (they are logged again); earlier segments that ended without a word are ``killed``."""
    truncate_history(record_path, segment["from_step"] if resume else -1)
    record = read_record(record_path)
    update_record(
        record_path,
        status="running",
        overrides=_overrides(),
        config=OmegaConf.to_container(cfg, resolve=True),
        identity=now,
        batch_plan=dataclasses.asdict(plan),
        provenance=provenance(),
        resumed_from=str(resume) if resume else None,
        accepted_code_changes=(record.get("accepted_code_changes") or []) + ([accepted] if accepted else []),
        segments=[
            *({**s, "ended": s.get("ended", "killed")} for s in (record.get("segments") or [])),
            {
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "started_unix": start,
                **segment,
                "wall_time_s": 0.0,
            },
        ],
        error=None,
        stop_reason=None,
        stopped_at_step=None,
        stopped_at_epoch=None,
    )


def _end_segment(record_path: Path, start: float, **fields) -> dict:
    """Close this process's segment of the run: its wall time, and the run's total over all segments."""
    record = read_record(record_path)
    segments = record.get("segments") or []
    if segments:
        segments[-1]["wall_time_s"] = time.time() - start
        segments[-1]["ended"] = fields.get("status")
    total = sum(s.get("wall_time_s", 0.0) for s in segments)
    return update_record(record_path, segments=segments, wall_time_s=total, **fields)


def _jobs_not_run() -> list[str]:
    """In a sequential multirun, the override sets of the jobs after this one, in Hydra's order."""
    hc = HydraConfig.get()
    if hc.launcher.get("_target_") != sweep.hydra_internals().basic_launcher:
        return []  # parallel launchers start jobs in their own order
    args = [a for a in sys.argv[1:] if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    params = [f"{k}={v}" for k, v in (hc.sweeper.get("params") or {}).items()]
    return [sweep.describe(job) for job in sweep.expand(params + args)[hc.job.num + 1 :]]


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """How one job ended, for the entry point: its directory, exit status and final accuracy.

    ``exit_code`` is 0 (completed, diverged, or already finished), 1 (failed) or 2 (refused before
    training). Interruptions are not outcomes: they end the process (``SystemExit``) at once.
    """

    out_dir: Path
    exit_code: int = 0
    val_acc: float | None = None

    @property
    def failed(self) -> bool:
        return self.exit_code != 0


@dataclasses.dataclass
class _Job:
    """What the steps of one job share (so each step is a short function of one thing)."""

    cfg: DictConfig
    out_dir: Path
    multirun: bool
    rank_zero: bool
    start: float = dataclasses.field(default_factory=time.time)

    @property
    def record_path(self) -> Path:
        return self.out_dir / RECORD

    @property
    def last_ckpt(self) -> Path:
        return self.out_dir / "checkpoints" / "last.ckpt"


def run_job(cfg: DictConfig, out_dir: Path, multirun: bool = False) -> JobOutcome:
    """Run (or resume, or report) one job; returns how it ended (never exits, but on a signal).

    The entry point decides what an outcome means for the process: a single run exits with its
    ``exit_code``; a multirun goes on to the next job and exits 1 at the end if any failed.
    """
    try:
        check_inside(out_dir, cfg.paths.log_dir)  # before anything of ours is written there
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return JobOutcome(out_dir, EXIT_REFUSED)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank_zero = is_global_zero()  # under torchrun or SLURM every rank runs this; only rank 0 writes
    lock = job_lock(out_dir) if rank_zero else contextlib.nullcontext()
    try:
        with lock:
            return _run_locked(_Job(cfg, out_dir, multirun, rank_zero))
    except JobRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return JobOutcome(out_dir, EXIT_REFUSED)
    except Exception as e:  # outside training (where _train records it): never a sweep-ending traceback
        return _failed_outside_training(out_dir, e, rank_zero)
    finally:
        # the job's live W&B run, if any, gets the record's summary (final values, status, stop reason;
        # checkpoints if logger.wandb.log_model) and ends, however the job ended: otherwise the next
        # job of an in-process multirun would log into it
        finish_wandb(out_dir)


def _run_locked(job: _Job) -> JobOutcome:
    """The job's steps, in order, while this process holds the job's lock."""
    previous = _read_previous(job)
    built = _build_checked(job, previous)
    if job.cfg.fresh:
        previous = _start_fresh(job)
    now = identity(job.cfg)
    accepted = check_identity(previous, now, job.cfg, job.out_dir)
    if previous.get("status") in FINISHED:
        return _report_finished(job, previous, accepted)
    # fresh: what rank 0 deletes may still be there when another rank looks
    resume = job.last_ckpt if job.last_ckpt.exists() and not job.cfg.fresh else None
    resume_step = checkpoint_step(resume) if resume else -1
    trainer = _prepare_trainer(job, built, resume_step)
    if job.rank_zero:
        _save_hydra_files(job)
        segment = {"from_step": max(resume_step, 0), "world": world_of(trainer)}
        _start_segment(job.record_path, job.cfg, now, built.plan, resume, segment, accepted, job.start)
        if resume:
            print(f"[train] resuming from {resume} (step {resume_step})")
    _note_batchnorm(job, built)
    failure = _train(job, trainer, built, resume)
    if failure is not None:
        return failure
    return _write_final(job, trainer)


def _read_previous(job: _Job) -> dict:
    """The record a former launch left ({} if none): a record we cannot read is never trained over,
    unless ``fresh=true`` asks for the old result to go (then the unreadable record goes at once)."""
    try:
        return read_previous(job.record_path)
    except JobRefused as e:
        if not job.cfg.fresh:
            raise
        if job.rank_zero:
            print(f"[train] fresh=true: deleting the unreadable {RECORD} ({str(e).splitlines()[0]})")
            job.record_path.unlink(missing_ok=True)
        return {}


def read_previous(record_path: Path) -> dict:
    """The checked record at ``record_path`` ({} if none), or :class:`JobRefused` naming the field that
    fails :func:`lifecycle.record.read_record`'s checks. Its nullable fields may be null: every use
    here reads a list or object field as ``record.get(name) or []``."""
    try:
        return read_record(record_path)
    except RecordError as e:
        raise JobRefused(str(e)) from None


def _build_checked(job: _Job, previous: dict) -> Job:
    """Check every value and build everything before training, so a bad value costs no training.

    A refusal is recorded (unless it would overwrite a finished result) and ends the job with exit 2.
    """
    try:
        built = build_job(job.cfg, job.multirun)
        if job.rank_zero:
            built.datamodule.prepare_data()  # offline and no files: one clear error, before any training
    except (ConfigError, DataUnavailable) as e:
        if job.rank_zero and previous.get("status") not in FINISHED:
            update_record(
                job.record_path, status="failed", stop_reason="failed", error=str(e), overrides=_overrides()
            )
        raise JobRefused(str(e)) from None
    return built


def _start_fresh(job: _Job) -> dict:
    """``fresh=true``: delete what a former launch left, so nothing of it is resumed or reported.

    Rank 0 deletes; every rank goes on as if nothing were there (under torchrun or SLURM the other
    ranks look at the directory while rank 0 may not have deleted it yet)."""
    if not job.rank_zero:
        return {}
    for p in ("checkpoints", "csv", "wandb", "measurements", RECORD, "wandb_id.txt"):
        target = job.out_dir / p
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return {}


def _report_finished(job: _Job, previous: dict, accepted: dict | None) -> JobOutcome:
    """A finished job is reported, never retrained: re-running a sweep skips its finished jobs."""
    if accepted and job.rank_zero:
        update_record(
            job.record_path, accepted_code_changes=[*(previous.get("accepted_code_changes") or []), accepted]
        )
    print(f"[train] this job already finished ({previous['status']}); fresh=true trains it again.")
    print(summarize(read_record(job.record_path) if accepted and job.rank_zero else previous, job.out_dir))
    if job.rank_zero:  # with a W&B logger, a finished job reaches W&B from its record, once
        send_finished(job.cfg, job.out_dir)
    return JobOutcome(job.out_dir, 0, (previous.get("final") or {}).get("val/acc"))


def _prepare_trainer(job: _Job, built: Job, resume_step: int) -> pl.Trainer:
    """Loggers and the Trainer; an argument their classes refuse is a refusal, before training."""
    cfg = job.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        loggers = build_loggers(cfg, job.out_dir, keep_until_step=resume_step)
    except Exception as e:  # a logger argument its class refuses
        raise JobRefused(f"logger: {_cause(e)}") from None
    callbacks = list(built.callbacks)
    if cfg.get("fault"):  # a test tool: a fault at a named phase (conf/train.yaml)
        try:
            callbacks.insert(0, FaultInjection.parse(str(cfg.fault)))
        except ConfigError as e:
            raise JobRefused(str(e.under("fault"))) from None
    try:
        trainer = hydra.utils.instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers,
            accumulate_grad_batches=built.plan.accumulate,
            use_distributed_sampler=False,
            default_root_dir=str(job.out_dir),
        )
    except Exception as e:  # a trainer argument Lightning refuses
        raise JobRefused(f"trainer: {_cause(e)}") from None
    check_world(trainer, built.plan.world_size)
    check_rank(trainer, job.rank_zero)
    if trainer.world_size > 1:
        print(describe_process(trainer))
    return trainer


def _save_hydra_files(job: _Job) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml``: what this run trains with.

    Written here, by the process that holds the job's lock and is about to train, rather than by
    Hydra before the task starts (``hydra.output_subdir: null``): a refused launch (a lock held, a
    changed identity, a bad value) must leave the files of the run it refused as they were.
    """
    try:
        hc = HydraConfig.get()
    except ValueError:  # not started by Hydra (a test calling run_job)
        return
    out = job.out_dir / ".hydra"
    out.mkdir(exist_ok=True)
    OmegaConf.save(job.cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), out / "hydra.yaml")
    OmegaConf.save(hc.overrides.task, out / "overrides.yaml")


def _note_batchnorm(job: _Job, built: Job) -> None:
    """Say when BatchNorm sees fewer samples than the global batch: it changes what is trained."""
    plan = built.plan
    if (
        plan.world_size > 1
        and not job.cfg.trainer.sync_batchnorm
        and has_batchnorm(built.module.net)
        and job.rank_zero
    ):
        print(
            f"[train] note: BatchNorm uses per-device statistics over {plan.micro_batch} samples "
            f"(no SyncBatchNorm on this run); the global batch is {plan.global_batch}."
        )


def _train(job: _Job, trainer: pl.Trainer, built: Job, resume: Path | None) -> JobOutcome | None:
    """Train, then evaluate the final weights; None if that worked, else the failure's outcome.

    A signal ends the process (recorded as ``interrupted``); any other exception is recorded as
    ``failed`` (its type, message and traceback), so no ending leaves the record saying ``running``.
    """
    received: dict = {}
    pl.seed_everything(job.cfg.seed, workers=True, verbose=False)
    try:
        with signals_recorded(received):
            received["in_trainer"] = True
            trainer.fit(built.module, datamodule=built.datamodule, ckpt_path=str(resume) if resume else None)
            if received.get("signal"):  # arrived where Lightning only takes note (e.g. on_train_end)
                raise Interrupted(received["signal"])
            _final_evaluation(trainer, built)
            received["in_trainer"] = False
            if received.get("signal"):
                raise Interrupted(received["signal"])
    except (Interrupted, KeyboardInterrupt, SystemExit) as e:
        _interrupted(job, trainer, received, e)
    except Exception as e:
        return _failed(job, e)
    return None


def _final_evaluation(trainer: pl.Trainer, built: Job) -> None:
    """Evaluate the final weights on every eval set. It is not a per-epoch row, so no logger gets it."""
    trainer.loggers = []
    trainer.validate(built.module, datamodule=built.datamodule, verbose=False)


def _interrupted(job: _Job, trainer: pl.Trainer, received: dict, e: BaseException) -> NoReturn:
    """Record the interruption and end the process with the signal's exit status.

    Lightning turns SIGTERM into a SystemExit and Ctrl-C into sys.exit(1); an exit requested by
    someone else (submitit's requeue on a time limit exits from its USR2 handler) is recorded and
    passed on unchanged: it is not ours to turn into an exit status.
    """
    name = getattr(e, "signal_name", None) or received.get("signal")
    if name is None and (isinstance(e, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt)):
        name = "SIGINT"
    why = f"{name} received" if name else f"exit requested (SystemExit {getattr(e, 'code', None)!r})"
    if job.rank_zero:
        _end_segment(
            job.record_path, job.start, status="interrupted", error=f"{why} at step {trainer.global_step}"
        )
    if name is None:
        raise e
    print(
        f"[train] {why}: interrupted at step {trainer.global_step}. Run the same command to resume "
        f"from {job.last_ckpt if job.last_ckpt.exists() else 'the start'}.",
        file=sys.stderr,
    )
    if job.multirun and job.rank_zero:
        try:
            left = _jobs_not_run()
        except Exception as err:  # never hide the interruption behind a second error
            left = [f"(unknown: {err})"]
        print(f"[train] {len(left)} job(s) of this sweep did not run: " + "; ".join(left), file=sys.stderr)
    raise SystemExit(SIGNAL_EXIT.get(name, 1)) from None


def _failed(job: _Job, e: Exception) -> JobOutcome:
    """Record an exception as the job's failure (type, message, the traceback's tail); exit status 1.

    ``stop_reason`` becomes ``failed`` even when the budget was spent before the failure (e.g. at the
    final measurement), so no report reads "failed, max_epochs" as a run that ended by its budget;
    ``stopped_at_step`` and ``stopped_at_epoch`` keep how far it got.
    """
    if job.rank_zero:
        tail = traceback.format_exception(e)[-6:]
        _end_segment(
            job.record_path,
            job.start,
            status="failed",
            stop_reason="failed",
            error=f"{type(e).__name__}: {e}",
            traceback="".join(tail),
        )
    traceback.print_exc()
    where = f"recorded in {job.record_path}" if job.rank_zero else "global rank 0 records the job"
    print(f"[train] failed: {type(e).__name__}: {e} ({where})", file=sys.stderr)
    return JobOutcome(job.out_dir, EXIT_FAILED)


def _failed_outside_training(out_dir: Path, e: Exception, rank_zero: bool) -> JobOutcome:
    """An exception before or after training: recorded as a failure unless the record holds a finished
    result (which stays as it is); exit status 1, and a multirun goes on to its next job."""
    traceback.print_exc()
    print(f"[train] failed: {type(e).__name__}: {e}", file=sys.stderr)
    if rank_zero:
        with contextlib.suppress(RecordError, OSError):
            if read_record(out_dir / RECORD).get("status") not in FINISHED:
                update_record(
                    out_dir / RECORD,
                    status="failed",
                    stop_reason="failed",
                    error=f"{type(e).__name__}: {e}",
                    traceback="".join(traceback.format_exception(e)[-6:]),
                )
    return JobOutcome(out_dir, EXIT_FAILED)


def _write_final(job: _Job, trainer: pl.Trainer) -> JobOutcome:
    """Close the record: the final values (the last of every per-epoch metric, then the final
    evaluation), the history step each came from, the status and where the time went."""
    if not job.rank_zero:
        return JobOutcome(job.out_dir)
    record = read_record(job.record_path)
    evaluated = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    final = {**(record.get("last") or {}), **evaluated}
    # the history step each final measurement was logged at (the final evaluation has no row)
    steps = {k: v for k, v in (record.get("last_step") or {}).items() if k in final and k not in evaluated}
    status = "diverged" if record.get("stop_reason") == "diverged" else "completed"
    record = _end_segment(job.record_path, job.start, status=status, final=final, final_step=steps)
    record = update_record(job.record_path, time_split=time_split(record))
    print(summarize(record, job.out_dir))
    return JobOutcome(job.out_dir, 0, final.get("val/acc"))
