"""``AdversarialAccuracy``: clean and robust accuracy over an eps grid at epoch ends."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from callbacks.epoch_measurement import EpochEndMeasurement, stopping_after_this_epoch
from lightning_modules.config import check
from lightning_modules.module import log_rank_identical
from measures.attacks import (
    AttackSpec,
    AttackWork,
    autoattack_keys,
    robust_accuracy_counts,
    worst_case_keys,
)
from measures.batches import load_rank_subset, split_batches
from measures.checks import gradient_masking_warnings
from measures.module_state import preserved_module_state
from measures.names import ATTACKS, NORMS


class AdversarialAccuracy(EpochEndMeasurement):
    """Clean and robust accuracy over an eps grid, at epoch ends.

    A thin wrapper around :func:`measures.attacks.robust_accuracy_counts`: every
    ``every_n_epochs`` epochs and once more when training ends, on a FIXED, seeded, un-augmented
    subset of the test set (the same samples every epoch and run), with the unwrapped module in
    eval mode, it logs (``prefix`` = ``adv`` by default)::

        adv/clean                    clean accuracy on the subset
        adv/<attack>_<norm>/eps<e>   robust accuracy under each attack and eps (pixel units, [0, 1])
        adv/worst_<norm>/eps<e>      robust to FGSM and PGD of that norm (when two or more attack it)
        adv/autoattack_<norm>/eps<e> robust to every attack of that norm, APGD-CE/APGD-T included
                                     (when one of them runs: ``final_attacks``, or in ``attacks``)
        adv/nested                   1.0: nested eps counting (the default), 0.0: each eps on its own
        adv/n_samples, adv/seconds
        adv/n_grad                   per-sample input gradients (forward + backward passes) it took

    and, with ``full_test_at_end``, the final measurement on the whole test set under
    ``adv_full/``. A sample counts as robust when the model classifies it correctly at clean AND
    at every iterate of the attack (``early_exit=true``, as AutoAttack counts; samples wrong at
    clean are not attacked, and PGD stops on a sample once it is fooled), or on the final iterate
    only (``early_exit=false``, torchattacks' definition). Counts are summed over ranks with no
    sample on two ranks, and each sample's random start is seeded by (seed, its index in the
    test set), so the numbers are identical on any device count. Signs of gradient masking
    (:mod:`measures.checks`) are warned about.

    Nested eps (``nested_eps=true``, the default): a sample broken at some eps counts as broken at
    every larger eps of the same attack (its adversarial example lies in the larger ball too), and
    one wrong at clean at every eps. The eps are attacked in increasing order, each on the samples
    still robust at all smaller eps, so robust accuracy never rises with eps (it is the worst case
    over the grid, as early exit is the worst case over iterates), each value is <= the per-eps
    one, and the larger eps cost less. ``adv/worst_<norm>/eps<e>`` is then robust to every attack
    of the norm at every eps <= e. ``nested_eps=false`` evaluates each eps on its own (per-eps
    tables, as paper B's FGSM tables); only then can the check "accuracy rises with eps" (a sign
    of gradient masking) fire. ``adv/nested`` records which one a run used.

    The worst case (AutoAttack's APGD-CE and APGD-T, :mod:`measures.apgd`): ``final_attacks``
    (default none) names attacks run only at the final measurement (``at_end``, and the
    ``full_test_at_end`` one), e.g. ``[apgdce, apgdt]``: the epoch-end curves keep their cost and
    meaning (``worst_<norm>`` is FGSM/PGD only), and the final weights get ``adv/apgdce_<norm>``,
    ``adv/apgdt_<norm>`` and ``adv/autoattack_<norm>`` (robust to all of them, the worst case).
    ``apgd_steps`` (100) and ``apgd_target_classes`` (9) are AutoAttack's settings; APGD's
    norm is ``norm``.

    Progress: when a measurement runs longer than ``progress_every_s`` seconds, rank 0 logs where
    it is (attack, eps, batch) at most every ``progress_every_s`` seconds; a short one (the
    default run's) prints nothing.

    Args:
        every_n_epochs, every_n_steps, at_end, prefix: when to measure (exactly one of the two
            intervals) and the metric namespace (:class:`~callbacks.epoch_measurement.EpochEndMeasurement`).
        subset_size, subset_seed: the fixed test samples (null: the whole test set).
        batch_size: samples per attack batch.
        eps: the eps grid (pixel units); null: the dataset's ``default_eps``
            (:data:`lightning_modules.data.DATASETS`).
        attacks: any of fgsm, pgd, apgdce, apgdt; ``norm``: the ball of PGD and APGD (linf, l2);
            ``pgd_steps``, ``pgd_step_size`` (null: 2.5·eps/steps), ``random_start``.
        final_attacks: attacks run only at the final measurement (above); ``apgd_steps``,
            ``apgd_target_classes``: APGD's iterations and APGD-T's target classes.
        early_exit: the count described above.
        nested_eps: nested eps counting (above); false: each eps on its own.
        full_test_at_end: the final measurement on the whole test set.
        seed: the random starts' seed.
        progress_every_s: seconds between progress lines of a long measurement (null: none).
    """

    def __init__(
        self,
        every_n_epochs: int | None = 2,
        subset_size: int | None = 500,
        subset_seed: int = 0,
        batch_size: int = 500,
        eps: list[float] | None = None,
        attacks: list[str] = ("fgsm", "pgd"),
        norm: str = "linf",
        pgd_steps: int = 10,
        pgd_step_size: float | None = None,
        random_start: bool = True,
        final_attacks: list[str] = (),
        apgd_steps: int = 100,
        apgd_target_classes: int = 9,
        early_exit: bool = True,
        nested_eps: bool = True,
        full_test_at_end: bool = False,
        at_end: bool = True,
        seed: int = 0,
        prefix: str = "adv",
        progress_every_s: float | None = 10.0,
        every_n_steps: int | None = None,
    ):
        super().__init__(every_n_epochs, at_end, prefix, every_n_steps)
        self.check_subset_size(subset_size)
        check(all(a in ATTACKS for a in attacks), "attacks", list(attacks), f"allowed: {', '.join(ATTACKS)}")
        check(
            all(a in ATTACKS and a not in attacks for a in final_attacks),
            "final_attacks",
            list(final_attacks),
            f"allowed: {', '.join(ATTACKS)}, each not already in attacks",
        )
        for name, value in (("apgd_steps", apgd_steps), ("apgd_target_classes", apgd_target_classes)):
            check(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        check(norm in NORMS, "norm", norm, f"allowed: {', '.join(NORMS)}")
        check(
            eps is None or all(0 <= e <= 1 for e in eps),
            "eps",
            None if eps is None else list(eps),
            "each eps must be in [0, 1] (pixel units)",
        )
        check(
            isinstance(batch_size, int) and batch_size >= 1,
            "batch_size",
            batch_size,
            "must be a positive integer",
        )
        check(
            isinstance(pgd_steps, int) and pgd_steps >= 0, "pgd_steps", pgd_steps, "must be an integer >= 0"
        )
        check(
            pgd_step_size is None or pgd_step_size > 0, "pgd_step_size", pgd_step_size, "must be > 0 or null"
        )
        check(isinstance(nested_eps, bool), "nested_eps", nested_eps, "must be true or false")
        check(
            progress_every_s is None or progress_every_s > 0,
            "progress_every_s",
            progress_every_s,
            "must be > 0 or null (no progress lines)",
        )
        self.nested_eps, self.progress_every_s = nested_eps, progress_every_s
        self.subset_size, self.subset_seed = subset_size, subset_seed
        self.batch_size, self.eps, self.attacks, self.norm = batch_size, eps, list(attacks), norm
        self.pgd_steps, self.pgd_step_size, self.random_start = pgd_steps, pgd_step_size, random_start
        self.final_attacks, self.apgd_steps, self.apgd_target_classes = (
            list(final_attacks),
            apgd_steps,
            apgd_target_classes,
        )
        self.early_exit, self.full_test_at_end, self.at_end, self.seed = (
            early_exit,
            full_test_at_end,
            at_end,
            seed,
        )
        self.specs: list[AttackSpec] = []  # the epoch-end attacks
        self.final_specs: list[AttackSpec] = []  # and the final measurement's
        self._data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def check_against(self, model: nn.Module, datamodule) -> None:
        """Refuse, before training, a subset larger than the test set and more APGD-T target
        classes than the data has other classes."""
        self.check_subset(datamodule, "test", self.subset_size)
        classes = getattr(getattr(datamodule, "info", None), "num_classes", None)
        check(
            "apgdt" not in self.attacks + self.final_attacks
            or classes is None
            or self.apgd_target_classes <= classes - 1,
            "apgd_target_classes",
            self.apgd_target_classes,
            f"at most {None if classes is None else classes - 1} (the data's other classes)",
        )

    def metric_name(self, spec: AttackSpec) -> str:
        """``adv/<attack>_<norm>/eps<e>``: the logged name of one attack of the grid."""
        return f"{self.prefix}/{spec.name}_{spec.norm}/eps{spec.eps:.4g}"

    def worst_case_names(self, specs: list[AttackSpec] | None = None) -> dict[str, str]:
        """``{counts key: logged name}`` of the worst cases over attacks (``specs``: default the
        epoch-end ones): ``adv/worst_<norm>/eps<e>`` (FGSM/PGD) and ``adv/autoattack_<norm>/eps<e>``."""
        specs = self.specs if specs is None else specs
        return {
            key: f"{self.prefix}/{kind}_{norm}/eps{eps:.4g}"
            for kind, keys in (("worst", worst_case_keys(specs)), ("autoattack", autoattack_keys(specs)))
            for key, (norm, eps) in keys.items()
        }

    def build_specs(self, default_eps, final: bool = False) -> list[AttackSpec]:
        """The attack grid: every attack at every eps (``self.eps``, else ``default_eps``); with
        ``final``, ``final_attacks`` too (the final measurement's grid)."""
        eps = self.eps if self.eps is not None else default_eps
        specs = []
        for name in self.attacks + (self.final_attacks if final else []):
            norm = "linf" if name == "fgsm" else self.norm
            apgd = name.startswith("apgd")
            for e in eps:
                specs.append(
                    AttackSpec(
                        name=name,
                        eps=float(e),
                        norm=norm,
                        steps=self.apgd_steps if apgd else self.pgd_steps,
                        step_size=None if apgd else self.pgd_step_size,
                        random_start=self.random_start,
                        n_target_classes=self.apgd_target_classes,
                    )
                )
        return specs

    # ---- the measurement, usable without a Trainer (see measure.py) -------------------------
    def measure(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        progress=None,
        final: bool = False,
    ) -> dict[str, float]:
        """Clean and robust accuracy on this rank's samples (``idx``: their test-set indices).

        ``progress(done, total, message)``: called after each attack and eps of each batch (e.g. a
        progress bar), instead of the log lines every ``progress_every_s``. ``final``: the final
        measurement's grid (``final_attacks`` too).
        """
        start = time.perf_counter()
        work = AttackWork()
        specs = self.final_specs if final else self.specs
        with preserved_module_state(model, mode="eval"):
            counts = robust_accuracy_counts(
                model, split_batches(x, y, self.batch_size, extra=idx), specs, seed=self.seed,
                early_exit=self.early_exit, nested=self.nested_eps, work=work,
                progress=progress or self._progress_reporter(start),
            )  # fmt: skip
        for message in gradient_masking_warnings(counts, specs):
            rank_zero_warn(f"[AdversarialAccuracy] {message}")
        correct, total = counts["clean"]
        metrics = {f"{self.prefix}/clean": correct / max(total, 1)}
        names = {spec.key: self.metric_name(spec) for spec in specs} | self.worst_case_names(specs)
        for key, name in names.items():
            c, n = counts[key]
            metrics[name] = c / max(n, 1)
        metrics[f"{self.prefix}/nested"] = float(self.nested_eps)
        metrics[f"{self.prefix}/n_samples"] = float(total)
        metrics[f"{self.prefix}/n_grad"] = float(work.gradients)
        metrics[f"{self.prefix}/seconds"] = time.perf_counter() - start
        return metrics

    def _progress_reporter(self, start: float):
        """Rank 0 logs progress once ``progress_every_s`` have passed, then at most that often."""
        if self.progress_every_s is None:
            return None
        last = start

        def report(done: int, total: int | None, message: str) -> None:
            nonlocal last
            now = time.perf_counter()
            if now - last >= self.progress_every_s:
                last = now
                of = f"/{total}" if total else ""
                rank_zero_info(
                    f"[AdversarialAccuracy] {done}{of} attack-eps done, {now - start:.0f} s: {message}"
                )

        return report

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._data is not None:
            return
        dataset = self.measurement_dataset(trainer, "test")
        self.specs = self.build_specs(trainer.datamodule.info.default_eps)
        self.final_specs = self.build_specs(trainer.datamodule.info.default_eps, final=True)
        self._data = load_rank_subset(
            dataset, self.subset_size, self.subset_seed, trainer.global_rank, trainer.world_size
        )
        eps = sorted({s.eps for s in self.specs})
        rank_zero_info(
            f"[AdversarialAccuracy] {', '.join(self.attacks)} at eps {eps} "
            f"({'nested' if self.nested_eps else 'each eps on its own'}) on "
            f"{min(self.subset_size or len(dataset), len(dataset))} fixed test samples "
            f"{self.schedule}"
            + (
                f"; {', '.join(self.final_attacks)} at the final one"
                if self.final_attacks and self.at_end
                else ""
            )
        )

    def measure_module(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, data=None
    ) -> dict[str, float]:
        param = next(pl_module.parameters())
        x, y, idx = data or self._data
        final = self.at_end and stopping_after_this_epoch(trainer)
        return self.measure(
            pl_module, x.to(param.device, param.dtype), y.to(param.device), idx.to(param.device), final=final
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not (self.at_end and self.full_test_at_end and stopping_after_this_epoch(trainer)):
            return
        dataset = self.measurement_dataset(trainer, "test")
        data = load_rank_subset(dataset, None, self.subset_seed, trainer.global_rank, trainer.world_size)
        if metrics := self._run(trainer, pl_module, data):
            full = f"{self.prefix}_full/"
            log_rank_identical(pl_module, {full + k.split("/", 1)[1]: v for k, v in metrics.items()})
