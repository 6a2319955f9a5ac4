"""Send finished runs to W&B from their records: a run directory, or a whole sweep directory.

    python wandb_sync.py outputs/sweeps/fixed_lr_small          # every finished job under it
    python wandb_sync.py outputs/runs/<job> --project my-project --log-model

For a sweep run with the CSV logger, or offline on a cluster: each finished job (completed or
diverged) becomes one W&B run with the job's run id (``wandb_id.txt``, the id a live run of the
job used or would use), its per-epoch history on the ``epoch`` axis (and the per-step loss from
the CSV log, if there is one), its final values, status and stop reason as the summary, grouped
and configured as a live run (:mod:`lifecycle.wandb_run`). A job whose run already holds this very
record (sent by the job itself or by an earlier backfill: ``<job>/wandb/sent.json``) is skipped,
so running the command twice sends nothing twice; ``--force`` sends again.

Without credentials (or with ``WANDB_MODE=offline``) the runs are written offline into each job's
``wandb/`` folder; upload them later with ``wandb sync <job>/wandb/latest-run``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lifecycle import wandb_run
from lifecycle.loggers import wandb_mode
from lifecycle.record import RecordError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Send finished runs to W&B from their results.json and logs."
    )
    parser.add_argument("paths", type=Path, nargs="+", help="run directories or sweep directories")
    parser.add_argument("--project", default=None, help="W&B project (default: the job's logger config)")
    parser.add_argument(
        "--log-model", action="store_true", help="also the checkpoints and record as an artifact"
    )
    parser.add_argument("--force", action="store_true", help="send even runs already sent with this record")
    args = parser.parse_args(argv)
    jobs = []
    for path in args.paths:
        if not path.is_dir():
            print(f"error: {path} is not a directory", file=sys.stderr)
            return 2
        found = wandb_run.job_dirs(path)
        if not found:
            print(f"[wandb_sync] no results.json under {path}", file=sys.stderr)
        jobs += found
    mode = wandb_mode()  # offline without credentials; else as WANDB_MODE says
    os.environ.setdefault("WANDB_SILENT", "true")
    counts = {"sent": 0, "skipped": 0, "failed": 0}
    for job in jobs:
        try:
            outcome, message = wandb_run.send(
                job, project=args.project, mode=mode, log_model=args.log_model or None, force=args.force
            )
        except RecordError as e:
            outcome, message = "failed", str(e)
        counts[outcome] += 1
        print(f"[wandb_sync] {outcome}: {job}: {message}")
    print(f"[wandb_sync] {counts['sent']} sent, {counts['skipped']} skipped, {counts['failed']} failed")
    if counts["sent"] and (mode == "offline" or wandb_run.offline_mode()):
        print("[wandb_sync] written offline; upload with: wandb sync <job>/wandb/latest-run ...")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
