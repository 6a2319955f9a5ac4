"""The report of a sweep directory, one module per job (``report.py`` is its command line).

- :mod:`reporting.runs`: read every ``results.json`` (checked by :func:`lifecycle.record.check_record`;
  a bad one is noted, never a traceback), the grid's missing jobs, one tidy row per run, and which
  values count (:func:`~reporting.runs.counted`: at target, measurement converged);
- :mod:`reporting.figures`: the PNGs;
- :mod:`reporting.verdicts`: the study's trends judged over seeds, one module per study's
  comparisons (a new study adds a module to :data:`reporting.verdicts.STUDIES`), the worst-case
  gap and the verdict tables;
- :mod:`reporting.pipeline`: :func:`~reporting.pipeline.report`, everything above into one folder;
- :mod:`reporting.wandb`: the table and figures as one W&B run.

Reading and tidying import neither torch nor Lightning: a sweep is reported on any machine that
has its records, and quickly. This package imports nothing from here on import, so
``import reporting.runs`` stays that light.
"""
