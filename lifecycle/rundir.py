"""Run identity on disk: a job's directory is a function of its overrides, inside the log directory.

So two different jobs never share a directory (even when started in the same second) and the
same command finds its own directory again: that is how an interrupted run or sweep resumes.
The Hydra config (``conf/hydra/default.yaml``) names directories with the ``job_dirname`` and
``safe_name`` resolvers, registered by :func:`register_resolvers` (the entry points call it
before Hydra composes the config).

Names are percent-encoded: characters outside ``A-Za-z0-9=,._+-`` (``%`` included) become
``%XX`` per UTF-8 byte, so ``+note=a/b`` is ``+note=a%2Fb`` and ``+note=a_b`` stays itself.
Encoding is reversible, hence injective, and a name is one path component: no ``/``, no NUL,
never ``.``, ``..`` or hidden (a leading dot is ``%2E``), so no override leaves the log
directory. :func:`check_inside` checks the final directory anyway (an explicit
``hydra.run.dir=...`` could still point elsewhere).
"""

from __future__ import annotations

import hashlib
import os
import re
import string
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SAFE = frozenset(string.ascii_letters + string.digits + "=,._+-")
"""Characters a name keeps as they are; every other character is percent-encoded."""
MAX_LEN = 120
"""Longer names keep their first 100 characters and add a hash of the whole text."""
_PREFIX = 100
_HASHED = re.compile(r"-[0-9a-f]{10}\Z")  # the tail of a shortened name


class RunDirError(ValueError):
    """A job directory that would not lie inside the log directory, or a name that cannot be one."""


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # command-line bytes that are not UTF-8 arrive as surrogates


def quote(text: str) -> str:
    """``text`` percent-encoded as one readable path component (reversible with ``urllib.parse.unquote``)."""
    out = []
    for i, ch in enumerate(text):
        if ch in SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in _utf8(ch))
    return "".join(out)


def _component(text: str) -> str:
    name = quote(text)
    if len(name) > MAX_LEN:
        cut = _PREFIX
        while "%" in name[cut - 2 : cut]:  # do not split a %XX escape
            cut -= 1
        return name[:cut] + "-" + hashlib.sha1(_utf8(text)).hexdigest()[:10]
    if _HASHED.search(name):  # would read as a shortened name: write that dash as %2D
        name = name[:-11] + "%2D" + name[-10:]
    return name


def job_dirname(overrides: str) -> str:
    """Directory name of a job from its override string: readable, one path component, injective.

    ``""`` is ``default``; ordinary overrides keep their text (``optimizer.lr=0.01,seed=1``);
    other characters are percent-encoded (``~callbacks.hessian`` -> ``%7Ecallbacks.hessian``);
    names over 120 characters are shortened to 100 plus a hash of the whole override string.
    """
    if not overrides:
        return "default"
    name = _component(str(overrides))
    return "%64efault" if name == "default" else name  # the literal text "default" is not "no overrides"


def safe_name(name) -> str:
    """``experiment_name`` as the sweep directory's name: one path component, injective."""
    if name is None or str(name) == "":
        raise RunDirError("experiment_name is empty: it names the sweep directory, give it a name")
    return _component(str(name))


def check_inside(job_dir: str | os.PathLike, log_dir: str | os.PathLike) -> Path:
    """``job_dir`` as an absolute path, or :class:`RunDirError` unless it lies inside ``log_dir``.

    Compared after normalizing ``..`` (as Hydra does), without following symbolic links: a link
    the user placed inside the log directory is the user's choice.
    """
    if not str(log_dir).strip():
        raise RunDirError(
            "paths.log_dir is empty: it is where every run and sweep directory goes "
            "(an empty one would put them at the filesystem root). Give it a directory, or set SGD_LOG_DIR."
        )
    job, root = Path(os.path.abspath(job_dir)), Path(os.path.abspath(log_dir))
    if root not in job.parents:
        raise RunDirError(
            f"the job directory {job} is not inside the log directory {root} (paths.log_dir): "
            "every run and sweep directory lies inside it. Choose where runs go with paths.log_dir=... "
            "or SGD_LOG_DIR, not hydra.run.dir / hydra.sweep.dir."
        )
    return job


def register_resolvers() -> None:
    """Make ``${job_dirname:...}`` and ``${safe_name:...}`` available to Hydra configs (idempotent)."""
    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
    OmegaConf.register_new_resolver("safe_name", safe_name, replace=True)


class RunDirGuard(Callback):
    """Refuse a run or sweep directory outside ``paths.log_dir`` before Hydra writes anything.

    Hydra creates the job's directory (and sets up its ``train.log``) before it calls the task
    function, so a check in the job itself comes too late: with ``paths.log_dir=''`` the directory
    would already stand at the filesystem root. Hydra calls this callback (``hydra.callbacks`` in
    ``conf/hydra/default.yaml``) once the config is composed and before any directory is made:
    a single run's ``hydra.run.dir``, a sweep's ``hydra.sweep.dir``. A job directory of a sweep
    (``hydra.sweep.subdir``) is checked by the job itself (:func:`lifecycle.job.run_job`).
    The refusal exits with status 2, as the job's own refusals do.
    """

    @staticmethod
    def _refuse_outside(config: DictConfig, key: str, suffix: str = "") -> None:
        # Hydra sets this config as the current one right after this call (hydra.core.utils.run_job);
        # the directory's ${hydra:job.override_dirname} needs it now. Hydra turns an exception raised
        # here into a warning and goes on, so a refusal is an exit, the job's own exit status 2.
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)
        job_dir = Path(str(OmegaConf.select(config, key))) / suffix
        try:
            check_inside(job_dir, config.paths.log_dir)
        except RunDirError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._refuse_outside(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._refuse_outside(config, "hydra.sweep.dir", "job")  # a job's directory lies inside the sweep's
