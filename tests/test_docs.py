"""The documentation is run, not typed: README.md and docs/*.md against the code.

- every fenced ```bash block is either run here verbatim (in a copy of the project, runs written
  under the copy's ``outputs/``, W&B disabled) and must exit 0, or is marked right above it with
  ``<!-- long-running: TIME ... -->`` (with its measured time) or ``<!-- not-run: WHY -->``;
- the README's two commands are the ones ``.ci/run`` runs;
- the README's sample summary (its ``[train]`` lines) is what ``python train.py`` prints today,
  wall-clock numbers and the run directory's path aside;
- every relative link points to a file (and heading) of the repository, and no text points
  outside it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"<!--\s*(long-running|not-run):\s*(.+?)\s*-->")
A_TIME = re.compile(r"\d+(\.\d+)?\s*(s|min)\b")  # a long-running marker names its measured time
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def bash_blocks() -> list[tuple[str, int, str | None, str, str]]:
    """(file, line, marker kind, marker text, block) for every fenced ```bash block, in order."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```bash":
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                m = MARKER.search(above)
                kind, why = (m.group(1), m.group(2)) if m else (None, "")
                out.append(
                    (path.relative_to(ROOT).as_posix(), i + 1, kind, why, "\n".join(lines[i + 1 : end]))
                )
                i = end
            i += 1
    return out


BLOCKS = bash_blocks()
TO_RUN = [b for b in BLOCKS if b[2] is None]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, flags=re.M)}


# ---- fast ----------------------------------------------------------------------------------------
def test_readme_is_a_front_page_of_at_most_200_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_bash_block_is_run_or_marked_with_a_time_or_a_reason():
    assert len(BLOCKS) >= 5 and TO_RUN, "the block parser found too little"
    for file, line, kind, why, _ in BLOCKS:
        if kind == "long-running":
            assert A_TIME.search(why), f"{file}:{line}: a long-running block needs its measured time"
        elif kind == "not-run":
            assert why, f"{file}:{line}: a block not run needs a reason"


def test_readme_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    setup = [ln.strip() for ln in ci if re.match(r"\s*(python3 -m venv|\. \.venv|pip install)", ln)]
    (suite,) = [ln.strip() for ln in ci if ln.strip().startswith("ruff check")]
    readme = [b for b in BLOCKS if b[0] == "README.md"]
    assert readme[0][4] == " && ".join([*setup, "python train.py"])
    assert readme[1][4] == f". .venv/bin/activate && {suite}"


def test_relative_links_point_to_files_and_headings_of_the_repository():
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.is_relative_to(ROOT), f"{path.name}: {target} points outside the repository"
            assert dest.exists(), f"{path.name}: {target} does not exist"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest), f"{path.name}: no heading #{anchor} in {dest.name}"


def test_no_text_points_outside_the_repository():
    for path in DOCS:
        text = path.read_text()
        for bad in (r"\bshared/", r"(?<!\.)\.\./", r"STUDY\.md"):  # ("...": an elided path, not a parent)
            assert not re.search(bad, text), f"{path.name} matches {bad!r}"


# ---- slow: the commands themselves ----------------------------------------------------------------
SAMPLE_START = "[train] status:"


def normalize(line: str) -> str:
    """A [train] line without what changes from run to run: seconds, the time split, the run dir."""
    line = re.sub(r", \d+ s$", ", <s> s", line)  # status: ... after N epochs / M steps, T s
    if line.startswith("[train] time:"):
        line = re.sub(r"\d+ s \(\d+%\)", "<s> s (<p>%)", line)
    return re.sub(r"run dir: \S+", "run dir: <dir>", line)


def readme_sample() -> list[str]:
    """The README's sample summary: the fenced lines from the one starting ``[train] status:``."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(SAMPLE_START))
    assert lines[start - 1].strip() == "```", "the sample summary is a fenced block of its own"
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "```")
    return lines[start:end]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project in which the default job has run (``python train.py``, verbatim)."""
    root = tmp_path_factory.mktemp("docs") / "project"
    ignore = shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "wandb", "__pycache__")
    shutil.copytree(ROOT, root, ignore=ignore)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SGD_LOG_DIR": str(root / "outputs"),
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(
        ["python", "train.py"], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, env, proc.stdout


@pytest.mark.slow
def test_readme_sample_summary_is_what_the_default_run_prints(project):
    _, _, stdout = project
    fresh = [ln for ln in stdout.splitlines() if ln.startswith("[train] ")]
    assert [normalize(ln) for ln in readme_sample()] == [normalize(ln) for ln in fresh]


@pytest.mark.slow
@pytest.mark.parametrize("file,line,kind,why,block", TO_RUN, ids=[f"{b[0]}:{b[1]}" for b in TO_RUN])
def test_bash_block_runs_verbatim(project, file, line, kind, why, block):
    root, env, _ = project
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{file}:{line} exited {proc.returncode}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("override", ["optimizer.momentum=1.5", "callbacks.hessian.k=0"])
def test_configuration_error_samples_are_what_train_prints(project, override):
    """docs/configuration.md quotes the message a bad value gets: exit 2, that line on stderr."""
    root, env, _ = project
    text = (ROOT / "docs" / "configuration.md").read_text()
    (quoted,) = re.findall(rf"`(error: {re.escape(override)} is invalid: [^`]+)`", text)
    proc = subprocess.run(
        ["python", "train.py", override], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2 and quoted in proc.stderr.splitlines(), proc.stderr[-2000:]
