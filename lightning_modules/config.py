"""The settings a run is trained with, as dataclasses that check their own values.

Building them in Python is as safe as building them from YAML: a bad value raises
:class:`ConfigError` naming the key, the value and what is allowed. The job lifecycle builds
them (and every callback) before training starts and reports such an error under the key's
full config path (``optimizer.lr``, ``callbacks.hessian.k``) with exit status 2.
"""

from __future__ import annotations

import dataclasses
import math

from measures.names import NORMS, TRAINING_ATTACKS  # torch-free: the attacks that make training examples

LR_RULES = ("fixed", "ratio")
SCHEDULES = ("constant", "step", "cosine")
BN_MODES = ("eval", "train")


class ConfigError(ValueError):
    """A config value that cannot work: names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")

    def under(self, prefix: str) -> ConfigError:
        """The same error with the key's config path in front (``"k"`` -> ``"callbacks.hessian.k"``)."""
        return ConfigError(f"{prefix}.{self.key}", self.value, self.allowed)


def check(ok: bool, key: str, value, allowed: str) -> None:
    """Raise :class:`ConfigError` unless ``ok``."""
    if not ok:
        raise ConfigError(key, value, allowed)


def effective_lr(lr_rule: str, lr: float | None, lr_ratio: float | None, batch_size: int) -> float | None:
    """The learning rate SGD uses: ``lr`` (rule "fixed") or ``lr_ratio × batch_size`` (rule "ratio")."""
    if lr_rule == "ratio":
        return None if lr_ratio is None or batch_size is None else lr_ratio * batch_size
    return lr


def stability_threshold(lr: float | None, momentum: float | None) -> float | None:
    """Where full-batch gradient descent with heavy-ball momentum ``momentum`` stops being stable on a
    quadratic: 2(1 + β)/lr (Cohen et al. 2021, "edge of stability"); None without an lr."""
    if not lr or momentum is None:
        return None
    return 2 * (1 + momentum) / lr


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass
class SGDConfig:
    """SGD's hyperparameters (config group ``optimizer``).

    ``batch_size`` is the global batch. The learning rate is ``lr`` (``lr_rule="fixed"``) or
    ``lr_ratio × batch_size`` (``lr_rule="ratio"``: paper A's constant lr/B ratio); see
    :attr:`effective_lr`. Schedules: ``constant``, ``step`` (× ``gamma`` every ``step_epochs``),
    ``cosine`` (to 0 at the last step), each with an optional linear warmup.
    """

    batch_size: int = 128
    lr: float = 0.01
    lr_rule: str = "fixed"
    lr_ratio: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_epochs: float = 5
    gamma: float = 0.5
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        b = self.batch_size
        check(isinstance(b, int) and b > 0, "batch_size", b, "must be a positive integer (the global batch)")
        check(self.lr_rule in LR_RULES, "lr_rule", self.lr_rule, f"allowed: {', '.join(LR_RULES)}")
        if self.lr_rule == "fixed":
            check(_number(self.lr) and self.lr > 0, "lr", self.lr, "must be a number > 0")
        else:
            check(
                _number(self.lr_ratio) and self.lr_ratio > 0,
                "lr_ratio",
                self.lr_ratio,
                "must be a number > 0 with lr_rule=ratio",
            )
        check(
            _number(self.momentum) and 0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)"
        )
        check(isinstance(self.nesterov, bool), "nesterov", self.nesterov, "must be true or false")
        check(
            not (self.nesterov and self.momentum == 0),
            "nesterov",
            self.nesterov,
            "Nesterov needs momentum > 0",
        )
        check(_number(self.weight_decay), "weight_decay", self.weight_decay, "must be a number")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.schedule in SCHEDULES, "schedule", self.schedule, f"allowed: {', '.join(SCHEDULES)}")
        for key in ("step_epochs", "gamma", "warmup_epochs"):
            check(_number(getattr(self, key)), key, getattr(self, key), "must be a number")
        if self.schedule == "step":
            check(
                self.step_epochs > 0 and 0 < self.gamma <= 1,
                "step_epochs/gamma",
                (self.step_epochs, self.gamma),
                "need step_epochs > 0, 0 < gamma <= 1",
            )
        check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")

    @property
    def effective_lr(self) -> float:
        """The learning rate SGD uses (before the schedule's factor)."""
        return effective_lr(self.lr_rule, self.lr, self.lr_ratio, self.batch_size)

    def lr_factor(self, epoch: float, total_epochs: float) -> float:
        """Multiplier of the base lr at fractional ``epoch`` (0-based) of ``total_epochs``."""
        if self.schedule == "step":
            factor = self.gamma ** math.floor(epoch / self.step_epochs)
        elif self.schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * min(epoch / max(total_epochs, 1e-12), 1.0)))
        else:
            factor = 1.0
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            factor *= (epoch + 1e-12) / self.warmup_epochs
        return factor


@dataclasses.dataclass
class AdversarialTraining:
    """Train on adversarial examples (paper B's robust training; config key ``adversarial_training``).

    ``attack``: fgsm or pgd (``steps`` steps of ``step_size``, null: 2.5·eps/steps), in the
    ``norm`` ball of radius ``eps`` (pixel units); ``fraction`` of each batch is replaced;
    ``bn_mode`` is the module mode while the examples are made (eval leaves BatchNorm's running
    statistics untouched).
    """

    enabled: bool = False
    attack: str = "fgsm"
    eps: float = 0.1
    steps: int = 1
    step_size: float | None = None
    norm: str = "linf"
    fraction: float = 1.0
    bn_mode: str = "eval"

    def __post_init__(self) -> None:
        check(isinstance(self.enabled, bool), "enabled", self.enabled, "must be true or false")
        if not self.enabled:
            return
        check(
            self.attack in TRAINING_ATTACKS, "attack", self.attack, f"allowed: {', '.join(TRAINING_ATTACKS)}"
        )
        check(self.norm in NORMS, "norm", self.norm, f"allowed: {', '.join(NORMS)}")
        check(_number(self.eps) and self.eps >= 0, "eps", self.eps, "must be >= 0")
        check(
            _number(self.fraction) and 0 <= self.fraction <= 1, "fraction", self.fraction, "must be in [0, 1]"
        )
        check(self.bn_mode in BN_MODES, "bn_mode", self.bn_mode, f"allowed: {', '.join(BN_MODES)}")
        check(isinstance(self.steps, int) and self.steps >= 1, "steps", self.steps, "must be an integer >= 1")
