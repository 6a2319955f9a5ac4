"""Config composition of every group, and one readable error per bad value, before training.

The ``slow`` tests run ``train.py`` as a subprocess."""

from __future__ import annotations

import hydra
import pytest

from lifecycle.build import build_callbacks, build_job, build_model, validate
from lightning_modules.config import ConfigError
from tests.helpers import ROOT, run_train

GROUPS = ["data", "model", "optimizer", "trainer", "callbacks", "logger"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes_and_instantiates(compose, group, tmp_path):
    for option in _options(group):
        cfg = compose([f"{group}={option}", f"paths.log_dir={tmp_path}"])
        assert cfg.experiment_name == "adhoc"
        if group == "data":
            dm = hydra.utils.instantiate(cfg.data, batch_size=8)
            assert dm.name == option
        elif group == "model":
            data = "cifar10" if option in ("vgg", "resnet18") else "mnist5k"
            net = build_model(compose([f"model={option}", f"data={data}"]))
            assert sum(p.numel() for p in net.parameters()) > 0
        elif group == "optimizer":
            assert validate(cfg, multirun=False).global_batch == cfg.optimizer.batch_size
        elif group == "trainer":
            assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
            if cfg.trainer.accelerator == "cpu":
                t = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
                assert t.num_devices == cfg.trainer.devices
        elif group == "callbacks":
            for c in (cfg.callbacks or {}).values():
                assert callable(getattr(hydra.utils.instantiate(c), "setup", None))
        elif group == "logger":
            for lcfg in (cfg.logger or {}).values():
                assert hydra.utils.instantiate(lcfg).name


BAD = [
    (["optimizer.lr=0"], "optimizer.lr=0", "> 0"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1", "> 0"),
    (["optimizer.lr_rule=ratio"], "optimizer.lr_ratio=None", "> 0"),
    (["optimizer.lr_rule=sqrt"], "optimizer.lr_rule='sqrt'", "fixed, ratio"),
    (["optimizer.batch_size=0"], "optimizer.batch_size=0", "positive integer"),
    (["optimizer.batch_size=-8"], "optimizer.batch_size=-8", "positive integer"),
    (["optimizer.momentum=1.0"], "optimizer.momentum=1.0", "[0, 1)"),
    (["optimizer.momentum=-0.5"], "optimizer.momentum=-0.5", "[0, 1)"),
    (["optimizer.schedule=exp"], "optimizer.schedule='exp'", "constant, step, cosine"),
    (["data.augment=mixup"], "data.augment='mixup'", "none, crop, crop_flip"),
    (["data.name=svhn"], "data.name='svhn'", "mnist5k, mnist, fashion_mnist, cifar10, cifar100"),
    (["trainer=ddp_spawn", "optimizer.batch_size=127"], "optimizer.batch_size=127", "across 2 devices"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0", ">= 1"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs=-1", "needs trainer.max_steps > 0"),
]


@pytest.mark.parametrize("overrides,named,allowed", BAD, ids=[b[1] for b in BAD])
def test_bad_value_is_named_with_what_is_allowed(compose, overrides, named, allowed):
    with pytest.raises(ConfigError) as e:
        validate(compose(overrides), multirun=False)
    assert named in str(e.value) and allowed in str(e.value)


def test_model_that_does_not_fit_the_data_is_a_config_error(compose):
    with pytest.raises(ConfigError) as e:
        build_model(compose(["model=vgg", "data=mnist5k"]))
    assert "model='vgg' is invalid" in str(e.value) and "(1, 28, 28)" in str(e.value)


def test_local_multirun_with_plain_ddp_is_refused(compose):
    cfg = compose(["trainer=ddp_spawn", "trainer.strategy=ddp"])
    validate(cfg, multirun=False)  # a single run with ddp is fine
    with pytest.raises(ConfigError, match="ddp_spawn"):
        validate(cfg, multirun=True)


def test_micro_batches_split_the_per_device_batch_evenly(compose):
    plan = validate(compose(["trainer=ddp_spawn", "optimizer.batch_size=96", "max_micro_batch=20"]), False)
    assert (plan.per_device, plan.accumulate, plan.micro_batch) == (48, 3, 16)


@pytest.mark.slow
def test_bad_values_exit_nonzero_with_one_message_and_no_traceback(tmp_path):
    for args, expected in [
        (["optimizer.momentum=1.5"], "optimizer.momentum=1.5 is invalid"),
        (["model=vgg"], "does not fit data=mnist5k"),
        (["model=transformer"], "Could not find 'model/transformer'"),
        (["callbacks.hessian.k=0"], "callbacks.hessian.k=0 is invalid"),
        (["trainer.precision=17"], "trainer: "),
        (["+logger.csv.flush_every=3"], "logger: "),
    ]:
        proc = run_train(args, tmp_path, check=False)
        assert proc.returncode != 0
        assert expected in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert "Epoch" not in proc.stderr  # stopped before training


@pytest.mark.slow
def test_help_and_cfg_job_show_groups_and_config(tmp_path):
    import subprocess
    import sys

    helped = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert helped.returncode == 0
    groups = dict(ln.split(": ", 1) for ln in helped.stdout.splitlines() if ": " in ln and "," in ln)
    assert groups["model"] == "c1, lenet, mlp, resnet18, resnet20, vgg"
    assert {"const_ratio", "fixed_lr", "study", "saddle_free_small"} <= set(groups["experiment"].split(", "))
    assert groups["trainer"].startswith("cpu, ddp")
    job = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=c1", "--cfg", "job"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert job.returncode == 0 and "_target_: lightning_modules.models.c1" in job.stdout


def test_callbacks_refuse_bad_settings_by_name(compose):
    """Built from the config (the one path a run takes), a callback's bad value is named by its key."""
    with pytest.raises(ValueError, match="hessian.bn_mode='batch'"):
        build_callbacks(compose(["callbacks.hessian.bn_mode=batch"]))
    with pytest.raises(ValueError, match="adversarial.eps"):
        build_callbacks(compose(["callbacks.adversarial.eps=[0.1,8]"]))
    with pytest.raises(ValueError, match="adversarial.attacks"):
        build_callbacks(compose(["callbacks.adversarial.attacks=[cw]"]))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_validates_and_builds_its_callbacks(compose, experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment
    validate(cfg, multirun=True)
    assert build_callbacks(cfg)


@pytest.mark.parametrize(
    ("arm", "lr_rule", "momentum", "adversarial", "batch_size", "lr"),
    [
        ("fixed_m0", "fixed", 0.0, False, 512, 0.01),
        ("fixed_m09", "fixed", 0.9, False, 32, 0.01),
        ("ratio_m0", "ratio", 0.0, False, 32, 0.0025),
        ("ratio_m09", "ratio", 0.9, False, 512, 0.04),
        ("fixed_m09_fgsm", "fixed", 0.9, True, 128, 0.01),
    ],
)
def test_the_study_arms_set_the_papers_comparisons(
    compose, arm, lr_rule, momentum, adversarial, batch_size, lr
):
    """Each arm of experiment=study is one lr rule, momentum and training kind; the ratio rule gives
    B=128 the fixed lr (0.01), so B=32 gets 0.0025 and B=512 0.04."""
    from lightning_modules.config import effective_lr

    cfg = compose(["experiment=study", f"arm={arm}", f"optimizer.batch_size={batch_size}"])
    opt = cfg.optimizer
    assert (opt.lr_rule, opt.momentum, cfg.adversarial_training.enabled) == (lr_rule, momentum, adversarial)
    assert effective_lr(opt.lr_rule, opt.lr, opt.lr_ratio, opt.batch_size) == pytest.approx(lr)
    assert cfg.callbacks.training_target.target_train_acc == 0.99
    assert cfg.callbacks.hessian.every_n_steps == cfg.callbacks.adversarial.every_n_steps == 500
    assert list(cfg.callbacks.adversarial.final_attacks) == ["apgdce", "apgdt"]
    grid = cfg.hydra.sweeper.params
    arms = grid["arm"].split(",")
    assert sorted(arms) == sorted(p.stem for p in (ROOT / "conf" / "arm").glob("*.yaml"))
    assert len(arms) * len(grid["optimizer.batch_size"].split(",")) * len(grid["seed"].split(",")) == 45


REFUSED_BEFORE_TRAINING = [
    (["optimizer.batch_size=1000000"],
     "optimizer.batch_size=1000000 is invalid: larger than the 4000 training images", "use at most 4000"),
    (["optimizer.batch_size=4001", "data.drop_last=true"], "optimizer.batch_size=4001", "no step at all"),
    (["callbacks.hessian.k=100000"], "callbacks.hessian.k=100000 is invalid", "must be below max_iter"),
    (["callbacks.hessian.k=100000", "callbacks.hessian.max_iter=200000"],
     "callbacks.hessian.k=100000 is invalid", "the model has 61706 parameters"),
    (["callbacks.hessian.subset_size=4001"], "callbacks.hessian.subset_size=4001", "the 4000 training images"),
    (["callbacks.adversarial.subset_size=501"], "callbacks.adversarial.subset_size=501", "the 500 test images"),
    (["callbacks.adversarial.final_attacks=[apgdt]", "callbacks.adversarial.apgd_target_classes=10"],
     "callbacks.adversarial.apgd_target_classes=10", "at most 9"),
    (["data.train_eval_size=4001"], "data.train_eval_size=4001", "the 4000 training images"),
    (["data=mnist", "data.val_size=20000"], "data.val_size=20000", "at most 12000"),
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides,named,why", REFUSED_BEFORE_TRAINING, ids=[r[1] for r in REFUSED_BEFORE_TRAINING]
)
def test_settings_the_model_or_data_cannot_serve_are_refused_before_training(compose, overrides, named, why):
    with pytest.raises(ConfigError) as e:
        build_job(compose(overrides), multirun=False)
    assert named in str(e.value) and why in str(e.value), str(e.value)


def test_sizes_the_data_can_serve_are_built(compose):
    job = build_job(compose(["optimizer.batch_size=4000", "callbacks.hessian.subset_size=4000",
                             "callbacks.adversarial.subset_size=500", "trainer.max_epochs=-1",
                             "trainer.max_steps=5"]), multirun=False)  # fmt: skip
    assert job.plan.global_batch == 4000 and len(job.callbacks) == 6


@pytest.mark.slow
def test_a_setting_the_model_cannot_serve_exits_2_before_training(tmp_path):
    proc = run_train(
        ["callbacks.hessian.k=100000", "callbacks.hessian.max_iter=200000"], tmp_path, check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "callbacks.hessian.k=100000 is invalid" in proc.stderr and "Epoch" not in proc.stderr
