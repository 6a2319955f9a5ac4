"""ABS / ABSA in real ``train.py`` runs: the schedule in results.json, bad settings refused before
training, kill-and-resume equality, and 1 vs 2 ``ddp_spawn`` processes on the same schedule."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import NO_MEASURE, records, run_train

pytestmark = pytest.mark.slow

ABS = [*NO_MEASURE, "model=mlp", "threads=1", "callbacks=[default,adaptive_batch]"]
# B0 = 128: 32 steps an epoch at 128, 16 at 256; duration 2 doubles at the end of epochs 1 and 3
RESUMABLE = [
    *ABS,
    "trainer.precision=64-true",
    "trainer.max_epochs=4",
    "optimizer.batch_size=128",
    "optimizer.schedule=step",
    "optimizer.step_epochs=3",
    "callbacks.adaptive_batch.duration=2",
    "callbacks.adaptive_batch.max_batch_size=512",
]


def column(rec: dict, key: str) -> list[float]:
    return [row[key] for row in rec["history"] if key in row]


def test_absa_schedule_reaches_the_record_history_and_final(tmp_path):
    args = [
        *ABS,
        "trainer.max_epochs=3",
        "optimizer.batch_size=32",
        "callbacks.adaptive_batch.adversarial=true",
        "callbacks.adaptive_batch.duration=1",
        "callbacks.adaptive_batch.max_batch_size=1024",
    ]
    run_train(args, tmp_path)
    (rec,) = records(tmp_path).values()
    assert column(rec, "abs/batch_size") == [32, 64, 128]
    assert column(rec, "abs/adv_ratio") == pytest.approx([0.2, 0.1, 0.0])  # epoch 2 >= 3/2: stopped
    assert column(rec, "abs/lr") == pytest.approx([0.01, 0.02, 0.04])
    # 4,000 digits: 125 steps of 32, 63 of 64 (the last one short), 32 of 128
    assert column(rec, "abs/optimizer_steps") == [125, 188, 220]
    assert column(rec, "abs/samples") == [4000, 8000, 12000]
    assert len(column(rec, "abs/lambda")) == 3 and all(v > 0 for v in column(rec, "abs/lambda"))
    assert rec["final"]["abs/optimizer_steps"] == 220 and rec["final"]["abs/batch_size"] == 128


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("callbacks.adaptive_batch.max_batch_size=96", "callbacks.adaptive_batch.max_batch_size"),
        ("callbacks.adaptive_batch.max_batch_size=8192", "callbacks.adaptive_batch.max_batch_size"),
        ("callbacks.adaptive_batch.adv_ratio=1.5", "callbacks.adaptive_batch.adv_ratio"),
        ("callbacks.adaptive_batch.duration=0", "callbacks.adaptive_batch.duration"),
        ("callbacks.adaptive_batch.trigger=1", "callbacks.adaptive_batch.trigger"),
    ],
)
def test_bad_settings_exit_2_before_training_naming_the_key(tmp_path, override, key):
    proc = run_train([*ABS, "optimizer.batch_size=32", override], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{key}=" in proc.stderr and "is invalid" in proc.stderr and "Traceback" not in proc.stderr
    ((_, rec),) = records(tmp_path).items()
    assert rec["status"] == "failed" and not rec.get("history")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    log = tmp_path_factory.mktemp("a")
    run_train(RESUMABLE, log)
    (rec,) = records(log).values()
    return rec, torch.load(next(log.rglob("last.ckpt")), weights_only=False)


def test_the_uninterrupted_schedule(uninterrupted):
    rec, final = uninterrupted
    assert column(rec, "abs/batch_size") == [128, 128, 256, 256]
    assert column(rec, "abs/optimizer_steps") == [32, 64, 80, 96]
    # lr 0.01, x2 at the doubling, x0.5 from epoch 3 on (step schedule on epochs, not steps)
    assert column(rec, "abs/lr") == pytest.approx([0.01, 0.01, 0.02, 0.01])
    assert column(rec, "opt/lr") == pytest.approx([0.01, 0.01, 0.01, 0.01])  # lr after the last step
    assert final["global_step"] == 96


@pytest.mark.parametrize(
    "fault",
    [
        ["fault=SIGKILL@batch:40"],  # inside epoch 1, at whose end the batch doubles
        ["fault=SIGKILL@batch:70"],  # inside epoch 2, between doublings
        ["fault=SIGKILL@batch:70", "callbacks.checkpoint_interval.every_n_train_steps=5"],  # mid-epoch ckpt
    ],
    ids=["doubling_epoch", "between_doublings", "mid_epoch_checkpoint"],
)
def test_killed_and_rerun_follows_the_same_schedule_to_the_same_weights(tmp_path, uninterrupted, fault):
    rec_a, final_a = uninterrupted
    extra = fault[1:]
    killed = run_train([*RESUMABLE, *fault], tmp_path, check=False)
    assert killed.returncode != 0
    run_train([*RESUMABLE, *extra], tmp_path)
    (rec_b,) = records(tmp_path).values()
    assert rec_b["status"] == "completed" and rec_b["resumed_from"]
    final_b = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    assert final_b["global_step"] == final_a["global_step"]
    for k, v in final_a["state_dict"].items():
        assert torch.equal(v, final_b["state_dict"][k]), k
    for key in ("abs/batch_size", "abs/lr", "abs/lambda", "abs/lambda_ref", "abs/optimizer_steps", "opt/lr"):
        assert column(rec_b, key) == column(rec_a, key), key
    same = {k for k in rec_a["final"] if not k.endswith("seconds") and not k.startswith("time")}
    assert {k: rec_b["final"].get(k) for k in same} == {k: rec_a["final"][k] for k in same}


def test_one_and_two_processes_follow_the_same_schedule_to_the_same_weights(tmp_path, uninterrupted):
    rec_a, final_a = uninterrupted
    run_train([*RESUMABLE, "trainer=ddp_spawn", "trainer.devices=2"], tmp_path)
    (rec_b,) = records(tmp_path).values()
    final_b = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    for key in ("abs/batch_size", "abs/lr", "abs/optimizer_steps", "abs/samples"):
        assert column(rec_b, key) == column(rec_a, key), key
    assert column(rec_b, "abs/lambda") == pytest.approx(column(rec_a, "abs/lambda"), rel=1e-9)
    for k, v in final_a["state_dict"].items():
        assert torch.allclose(v, final_b["state_dict"][k], rtol=0, atol=1e-6), k
