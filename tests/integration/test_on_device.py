"""``data.on_device``: training on batches gathered from tensors on the device ends where the
DataLoader path ends, in one process, on two (``ddp_spawn``) and across a mid-epoch resume; the
record says which path ran, and a bad value is refused before training.

The gather path is tested on CPU tensors (``data.on_device=true`` on a CPU run); the same code
runs on a CUDA device, where only the tensors' device differs.
"""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from lifecycle.build import build_job
from lifecycle.loggers import RunRecord
from lifecycle.record import write_record
from lightning_modules.config import ConfigError, SGDConfig
from lightning_modules.data import ImageDataModule
from lightning_modules.models import mlp
from lightning_modules.module import SGDClassifier
from tests.helpers import NO_MEASURE, records, run_train, wall_clock
from tests.integration.test_mid_epoch_resume import ARGS, EVERY, ONE_DEVICE, kill_inside_second_epoch


def _fit(on_device: bool, tmp_path) -> tuple[dict, dict, torch.Tensor, dict]:
    """Two epochs of a small BatchNorm-free MLP on the embedded digits with random crops and flips
    (cosine schedule, momentum), then the final evaluation: metrics, weights, the global random
    state after it, and the run record."""
    torch.manual_seed(0)
    net = mlp((1, 28, 28), 10, hidden=[32])
    module = SGDClassifier(net, SGDConfig(lr=0.05, schedule="cosine"), per_device_batch=128, micro_batch=128)
    dm = ImageDataModule("mnist5k", augment="crop_flip", train_eval_size=1000, on_device=on_device)
    path = tmp_path / f"{on_device}.json"
    write_record(path, {"status": "running"})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=[RunRecord(path)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, datamodule=dm)
    trainer.loggers = []
    (final,) = trainer.validate(module, datamodule=dm, verbose=False)[:1]
    final = {k: v for k, v in final.items() if not wall_clock(k)}  # wall-clock time
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    return final, weights, torch.get_rng_state(), json.loads(path.read_text())


def test_two_epochs_with_augmentation_end_on_the_same_metrics_and_weights(tmp_path):
    off, w_off, rng_off, rec_off = _fit(False, tmp_path)
    on, w_on, rng_on, rec_on = _fit(True, tmp_path)
    assert (rec_off["data_on_device"], rec_on["data_on_device"]) == (False, True)
    assert {"val/loss", "test/acc", "train_eval/loss"} <= set(off) and set(off) == set(on)
    for k in off:
        assert abs(off[k] - on[k]) <= 1e-6 * max(1.0, abs(off[k])), (k, off[k], on[k])
    assert all(torch.allclose(w_off[k], w_on[k], rtol=0, atol=1e-6) for k in w_off)
    assert off["train_eval/loss"] < 2.0  # it trained (chance: ln 10 = 2.3)
    assert torch.equal(rng_off, rng_on)  # the same random numbers were drawn, in the same order


def test_a_bad_value_is_refused_before_anything_is_built(compose):
    for bad in ("yes", "1"):
        with pytest.raises(ConfigError) as e:
            build_job(compose([f"data.on_device={bad}"]), multirun=False)
        assert e.value.key == "data.on_device" and "allowed: auto, true, false" in str(e.value)
    with pytest.raises(ConfigError, match="num_workers=0"):
        build_job(compose(["data.on_device=true", "data.augment=crop", "data.num_workers=1"]), multirun=False)


def _final(rec: dict) -> dict:
    return {k: v for k, v in rec["final"].items() if not wall_clock(k)}


@pytest.mark.slow
def test_two_ddp_spawn_processes_end_on_the_same_record_with_either_path(tmp_path):
    args = [*NO_MEASURE, "model=mlp", "model.hidden=[32]", "trainer.max_epochs=2", "threads=1",
            "trainer=ddp_spawn", "trainer.devices=2", "data.augment=crop_flip"]  # fmt: skip
    for v in ("false", "true"):
        run_train([*args, f"data.on_device={v}"], tmp_path / v)
    (off,) = records(tmp_path / "false").values()
    (on,) = records(tmp_path / "true").values()
    assert on["batch_plan"]["world_size"] == off["batch_plan"]["world_size"] == 2
    assert (off["data_on_device"], on["data_on_device"]) == (False, True)
    a, b = _final(off), _final(on)
    assert a.keys() == b.keys() and "val/loss" in a
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (k, a[k], b[k])


@pytest.mark.slow
def test_killed_mid_epoch_on_device_resumes_onto_the_dataloader_run(tmp_path):
    """The uninterrupted DataLoader run and an on-device run killed inside its second epoch and
    rerun: the same final weights (float64, as in test_mid_epoch_resume)."""
    run_train([*ARGS, *ONE_DEVICE, "data.on_device=false"], tmp_path / "a")
    final_a = torch.load(next((tmp_path / "a").rglob("last.ckpt")), weights_only=False)
    args = [*ARGS, *ONE_DEVICE, *EVERY, "data.on_device=true"]
    for attempt in range(3):
        log_b = tmp_path / f"b{attempt}"
        if kill_inside_second_epoch(args, log_b) is not None:
            break
    else:
        pytest.fail("never killed inside the second epoch")
    out = run_train(args, log_b)
    assert "resuming from" in out.stdout and "gathered on the device" in out.stdout
    (rec,) = records(log_b).values()
    assert rec["status"] == "completed" and rec["data_on_device"] is True
    final_b = torch.load(next(log_b.rglob("last.ckpt")), weights_only=False)
    assert final_a["global_step"] == final_b["global_step"]
    for k, v in final_a["state_dict"].items():
        assert torch.allclose(v, final_b["state_dict"][k], rtol=0, atol=1e-12), k
