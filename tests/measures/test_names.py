"""The attacks' names (``measures.names``): one definition, readable without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from measures.names import APGD_ATTACKS, ATTACKS, NORMS, TRAINING_ATTACKS


def test_training_attacks_are_the_measured_attacks_less_apgd():
    assert set(TRAINING_ATTACKS) | set(APGD_ATTACKS) == set(ATTACKS)
    assert not set(TRAINING_ATTACKS) & set(APGD_ATTACKS)
    assert NORMS == ("linf", "l2")


def test_the_run_config_reads_the_names_without_importing_torch():
    code = (
        "import sys, measures.names, lightning_modules.config as c; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert c.NORMS is measures.names.NORMS and c.TRAINING_ATTACKS is measures.names.TRAINING_ATTACKS"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
