"""The job lifecycle, between the Hydra entry point and the training code.

- :mod:`lifecycle.build`: one validation path and the batch plan; builds model, data,
  LightningModule and callbacks before anything is trained;
- :mod:`lifecycle.identity`: what a result belongs to (config, measurement settings, code) and its provenance;
- :mod:`lifecycle.rundir`: run identity on disk (a job's directory from its overrides);
- :mod:`lifecycle.record`: the result record ``results.json``: its schema, checked reader, locked
  writers and the facts read from it (stop reasons, reached target, unconverged measurements);
  standard library only, so ``report`` and ``wandb_sync.py`` read records without torch or Lightning;
- :mod:`lifecycle.sweep`: which jobs a sweep directory expects (its ``multirun.yaml``) and which
  overrides identify a job, by Hydra's own override parser;
- :mod:`lifecycle.loggers`: CSV / W&B loggers and the record logger (:class:`~lifecycle.loggers.RunRecord`);
- :mod:`lifecycle.wandb_run`: what a job's W&B run holds (history axes, summary, group), live or
  sent later from its record (``wandb_sync.py``);
- :mod:`lifecycle.summary`: the console summary;
- :mod:`lifecycle.guards`: the job lock, signals recorded as an interruption, the identity check;
- :mod:`lifecycle.job`: one job from start to record (fresh, resume, skip).

``train.py`` calls :func:`lifecycle.job.run_job`; ``measure.py``, ``report.py`` and ``wandb_sync.py``
use the record and the builders from here, never ``train``.
"""
