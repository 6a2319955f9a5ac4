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
from pathlib import Path

from omegaconf import OmegaConf

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
