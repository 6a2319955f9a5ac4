"""``AdversarialAccuracy``: clean and robust accuracy over an eps grid at epoch ends.

A thin wrapper around :func:`callbacks.adversarial.robust_accuracy_counts`: every
``every_n_epochs`` epochs and once more when training ends, on a FIXED, seeded, un-augmented
subset of the test set (the same samples every epoch and run), with the unwrapped module in
eval mode, it logs

    adv/clean                    clean accuracy on the subset
    adv/<attack>_<norm>/eps<e>   robust accuracy under each attack and eps (pixel units, [0, 1])
    adv/n_samples, adv/seconds

"Robust accuracy" counts a sample as robust when the model classifies it correctly at clean
AND at every iterate of the attack (``early_exit=true``, as AutoAttack counts; samples wrong at
clean are not attacked, and PGD stops on a sample once it is fooled), or on the final iterate
only (``early_exit=false``, torchattacks' definition). Counts are summed over ranks with no
sample on two ranks, and each sample's random start is seeded by (seed, its index in the test
set), so the numbers are identical on any device count. At the end of training the full
test set can be used (``full_test_at_end=true``). Signs of gradient masking (accuracy rising
with eps, PGD above FGSM, eps=0 not equal to clean) are warned about.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from callbacks.adversarial import AttackSpec, gradient_masking_warnings, robust_accuracy_counts
from callbacks.common import (
    preserved_module_state,
    split_batches,
)
from callbacks.epoch_measurement import EpochEndMeasurement, load_rank_subset
from callbacks.run_record import log_after_training

# eps grids in [0, 1] pixel units that include small eps: naturally trained nets reach ~0% at
# the standard large eps (MNIST 0.3, CIFAR 8/255), see STUDY.md
DEFAULT_EPS = {
    "mnist": [0.0, 0.02, 0.05, 0.1, 0.2, 0.3],
    "cifar": [0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255],
}
DATASET_FAMILY = {
    "mnist5k": "mnist",
    "mnist": "mnist",
    "fashion_mnist": "mnist",
    "cifar10": "cifar",
    "cifar100": "cifar",
}


def metric_name(spec: AttackSpec) -> str:
    return f"adv/{spec.name}_{spec.norm}/eps{spec.eps:.4g}"


class AdversarialAccuracy(EpochEndMeasurement):
    def __init__(
        self,
        every_n_epochs: int = 1,
        subset_size: int | None = 500,
        subset_seed: int = 0,
        batch_size: int = 500,
        eps: list[float] | None = None,
        attacks: list[str] = ("fgsm", "pgd"),
        norm: str = "linf",
        pgd_steps: int = 10,
        pgd_step_size: float | None = None,
        random_start: bool = True,
        early_exit: bool = True,
        full_test_at_end: bool = False,
        at_end: bool = True,
        seed: int = 0,
    ):
        super().__init__(every_n_epochs, at_end, "adversarial")
        if subset_size is not None and not (isinstance(subset_size, int) and subset_size >= 1):
            raise ValueError(
                f"adversarial.subset_size={subset_size!r}: must be a positive integer or null (all)"
            )
        bad = [a for a in attacks if a not in ("fgsm", "pgd")]
        if bad:
            raise ValueError(f"adversarial.attacks={list(attacks)!r}: allowed fgsm, pgd")
        if eps is not None and any(not (0 <= e <= 1) for e in eps):
            raise ValueError(f"adversarial.eps={list(eps)!r}: each eps must be in [0, 1] (pixel units)")
        self.subset_size, self.subset_seed = subset_size, subset_seed
        self.batch_size, self.eps, self.attacks, self.norm = batch_size, eps, list(attacks), norm
        self.pgd_steps, self.pgd_step_size, self.random_start = pgd_steps, pgd_step_size, random_start
        self.early_exit, self.full_test_at_end, self.at_end, self.seed = (
            early_exit,
            full_test_at_end,
            at_end,
            seed,
        )
        self.specs: list[AttackSpec] = []
        self._data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def build_specs(self, dataset_name: str) -> list[AttackSpec]:
        eps = self.eps if self.eps is not None else DEFAULT_EPS[DATASET_FAMILY.get(dataset_name, "mnist")]
        specs = []
        for name in self.attacks:
            norm = "linf" if name == "fgsm" else self.norm
            for e in eps:
                specs.append(
                    AttackSpec(
                        name=name,
                        eps=float(e),
                        norm=norm,
                        steps=self.pgd_steps,
                        step_size=self.pgd_step_size,
                        random_start=self.random_start,
                    )
                )
        return specs

    # ---- the measurement, usable without a Trainer (see measure.py) -------------------------
    def measure(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
    ) -> dict[str, float]:
        """Clean and robust accuracy on this rank's samples (``idx``: their test-set indices)."""
        start = time.perf_counter()
        with preserved_module_state(model, mode="eval"):
            counts = robust_accuracy_counts(
                model, split_batches(x, y, self.batch_size, extra=idx), self.specs, seed=self.seed,
                early_exit=self.early_exit,
            )  # fmt: skip
        for message in gradient_masking_warnings(counts, self.specs):
            rank_zero_warn(f"[AdversarialAccuracy] {message}")
        correct, total = counts["clean"]
        metrics = {"adv/clean": correct / max(total, 1)}
        for spec in self.specs:
            c, n = counts[spec.key]
            metrics[metric_name(spec)] = c / max(n, 1)
        metrics["adv/n_samples"] = float(total)
        metrics["adv/seconds"] = time.perf_counter() - start
        return metrics

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._data is not None:
            return
        self.specs = self.build_specs(trainer.datamodule.name)
        dataset = trainer.datamodule.measurement_dataset("test")
        self._data = load_rank_subset(
            dataset, self.subset_size, self.subset_seed, trainer.global_rank, trainer.world_size
        )
        eps = sorted({s.eps for s in self.specs})
        rank_zero_info(
            f"[AdversarialAccuracy] {', '.join(self.attacks)} at eps {eps} on "
            f"{min(self.subset_size or len(dataset), len(dataset))} fixed test samples every "
            f"{self.every_n_epochs} epoch(s)"
        )

    def _measure_module(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, data=None
    ) -> dict[str, float]:
        param = next(pl_module.parameters())
        x, y, idx = data or self._data
        return self.measure(
            pl_module, x.to(param.device, param.dtype), y.to(param.device), idx.to(param.device)
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.at_end and self.full_test_at_end):
            return super().on_train_end(trainer, pl_module)
        dataset = trainer.datamodule.measurement_dataset("test")
        data = load_rank_subset(dataset, None, self.subset_seed, trainer.global_rank, trainer.world_size)
        if metrics := self._run(trainer, pl_module, data):
            log_after_training(trainer, {k.replace("adv/", "adv_full/", 1): v for k, v in metrics.items()})
