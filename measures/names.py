"""The names of the attacks and norms, torch-free.

One definition of each, read by the attacks (:mod:`measures.attacks`, :mod:`measures.pgd`,
:mod:`measures.apgd`) and by the run's config (:mod:`lightning_modules.config`), which must stay
importable without torch (reading a run record imports it). Importing this module imports nothing.
"""

NORMS = ("linf", "l2")
"""The threat models: the L∞ and the L2 ball. Every attack here has both, FGSM L∞ only."""

APGD_ATTACKS = ("apgdce", "apgdt")
"""AutoAttack's APGD-CE and targeted APGD-DLR (:mod:`measures.apgd`): evaluation only."""

TRAINING_ATTACKS = ("fgsm", "pgd")
"""The attacks that make adversarial training examples (:func:`measures.attacks.adversarial_examples`)."""

ATTACKS = (*TRAINING_ATTACKS, *APGD_ATTACKS)
"""Every attack a robust accuracy can be measured with (:class:`measures.attacks.AttackSpec`)."""
