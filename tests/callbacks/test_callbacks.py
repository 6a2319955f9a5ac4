"""The measurement callbacks on a model: exact values, any grad mode, state restored."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from callbacks.adversarial_accuracy import AdversarialAccuracy
from callbacks.hessian_spectrum import HessianSpectrum
from lightning_modules.config import ConfigError
from lightning_modules.data import DATASETS
from measures.attacks import AttackWork, robust_accuracy_counts, worst_case_key
from measures.batches import split_batches
from tests.helpers import exact_hessian


def tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("grad_mode", ["enabled", "no_grad", "inference_mode"])
def test_hessian_callback_measures_exact_spectrum_in_any_grad_mode(grad_mode):
    net = tiny_bn_net().train()  # the callback switches to eval for the measurement and back
    buffers = [b.clone() for b in net.buffers()]
    cb = HessianSpectrum(k=3, smallest=True, batch_size=7, tol=1e-8)
    ctx = {"enabled": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[
        grad_mode
    ]
    with ctx():
        x, y = torch.rand(17, 1, 6, 6, dtype=torch.float64), torch.arange(17) % 3
        metrics = cb.measure(net, nn.functional.cross_entropy, x, y)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers(), strict=True))
    assert all(p.grad is None for p in net.parameters())
    exact = torch.linalg.eigvalsh(
        exact_hessian(net.eval(), nn.functional.cross_entropy, x.clone(), y.clone())
    )
    top = exact.flip(0)[:3]
    for i in range(3):
        assert abs(metrics[f"hessian/lambda_{i + 1}"] - top[i]) <= 1e-6 * abs(top[0])
    assert abs(metrics["hessian/lambda_min"] - exact[0]) <= 1e-6 * abs(top[0])
    assert metrics["hessian/n_hvp"] > 0 and metrics["hessian/converged"] == 1.0
    # the logged error estimate is never below the true error
    true = max(abs(metrics[f"hessian/lambda_{i + 1}"] - float(top[i])) for i in range(3))
    true = max(true, abs(metrics["hessian/lambda_min"] - float(exact[0])))
    assert true / abs(float(top[0])) <= metrics["hessian/rel_error"] <= 1e-8


def moved(net: nn.Module, seed: int) -> nn.Module:
    """The same network one 'epoch' later: weights moved a little."""
    net = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def test_hessian_warm_start_survives_a_resume_exactly_and_falls_back_to_cold():
    nets = [tiny_bn_net()]
    for seed in (1, 2, 3):
        nets.append(moved(nets[-1], seed))
    x, y = torch.rand(17, 1, 6, 6, dtype=torch.float64), torch.arange(17) % 3
    loss = nn.functional.cross_entropy
    cb = HessianSpectrum(k=2, batch_size=7, warm_start=True)
    first = cb.measure(nets[0], loss, x, y)
    saved = cb.state_dict()
    dim = sum(p.numel() for p in nets[0].parameters())
    assert saved["start_vector"].shape == (dim,) and saved["cold_hvp"] == first["hessian/n_hvp"]
    second = cb.measure(nets[1], loss, x, y)
    assert (first["hessian/warm"], second["hessian/warm"]) == (0.0, 1.0)
    # a resumed run (a new callback, the checkpointed state) measures exactly as the uninterrupted one
    resumed = HessianSpectrum(k=2, batch_size=7, warm_start=True)
    resumed.load_state_dict(saved)
    again = resumed.measure(nets[1], loss, x, y)
    assert {k: v for k, v in again.items() if k != "hessian/seconds"} == {
        k: v for k, v in second.items() if k != "hessian/seconds"
    }
    # too large for the checkpoint (cap 0 MB): not kept, the resumed run starts cold
    capped = HessianSpectrum(k=2, batch_size=7, warm_start=True, warm_start_checkpoint_mb=0)
    capped.measure(nets[0], loss, x, y)
    assert "start_vector" not in capped.state_dict()
    fresh = HessianSpectrum(k=2, batch_size=7, warm_start=True)
    fresh.load_state_dict(capped.state_dict())
    assert fresh.measure(nets[1], loss, x, y)["hessian/warm"] == 0.0
    # a warm start that did not pay (at least the last cold count): the next one is cold, then warm again
    assert cb._next_cold == (second["hessian/n_hvp"] >= first["hessian/n_hvp"])
    cb._cold_hvp, cb._next_cold = 1, False  # as if the last cold measurement had cost 1 product
    assert cb.measure(nets[2], loss, x, y)["hessian/warm"] == 1.0
    assert cb.measure(nets[3], loss, x, y)["hessian/warm"] == 0.0
    assert cb.measure(nets[2], loss, x, y)["hessian/warm"] == 1.0


def test_hessian_float64_reference_leaves_the_model_in_its_precision():
    net = tiny_bn_net().float().eval()
    x, y = torch.rand(17, 1, 6, 6), torch.arange(17) % 3
    ref = HessianSpectrum(k=2, batch_size=7, float64=True, tol=1e-10).measure(
        net, nn.functional.cross_entropy, x, y
    )
    assert all(p.dtype == torch.float32 for p in net.parameters())
    exact = torch.linalg.eigvalsh(
        exact_hessian(copy.deepcopy(net).double(), nn.functional.cross_entropy, x.double(), y)
    ).flip(0)
    assert abs(ref["hessian/lambda_1"] - float(exact[0])) <= 1e-9 * abs(float(exact[0]))
    assert ref["hessian/rel_error"] < 1e-9  # float32 products could not give this


@pytest.fixture
def one_thread():
    """Tiny tensors: two OpenMP threads on shared cores made the attack tests ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_adversarial_callback_counts_match_the_function_in_any_grad_mode(grad_mode):
    net = tiny_bn_net().float().train()
    cb = AdversarialAccuracy(eps=[0.0, 0.05, 0.2], batch_size=8, pgd_steps=3)
    cb.specs = cb.build_specs(DATASETS["mnist5k"].default_eps)
    x, y, idx = torch.rand(20, 1, 6, 6), torch.arange(20) % 3, torch.arange(20) + 100
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad_mode]
    with ctx():
        metrics = cb.measure(net, x.clone(), y, idx)
    assert net.training
    work = AttackWork()
    ref = robust_accuracy_counts(net.eval(), [(x, y, idx)], cb.specs, seed=0, work=work)
    assert metrics["adv/clean"] == ref["clean"][0] / 20
    for spec in cb.specs:
        assert metrics[cb.metric_name(spec)] == ref[spec.key][0] / 20
    assert metrics["adv/fgsm_linf/eps0"] == metrics["adv/clean"]
    for eps in (0.0, 0.05, 0.2):
        assert metrics[f"adv/worst_linf/eps{eps:.4g}"] == ref[worst_case_key("linf", eps)][0] / 20
    assert metrics["adv/nested"] == 1.0 and metrics["adv/n_grad"] == work.gradients > 0


@pytest.mark.usefixtures("one_thread")
def test_adversarial_callback_nested_by_default_and_each_eps_on_its_own_when_asked(monkeypatch):
    net = tiny_bn_net().float().eval()
    x, y, idx = torch.rand(30, 1, 6, 6), torch.arange(30) % 3, torch.arange(30)
    lines = []
    monkeypatch.setattr("callbacks.adversarial_accuracy.rank_zero_info", lines.append)
    metrics = {}
    for nested in (True, False):
        cb = AdversarialAccuracy(eps=[0.0, 0.05, 0.2, 0.4], batch_size=8, pgd_steps=3, nested_eps=nested)
        cb.specs = cb.build_specs(DATASETS["mnist5k"].default_eps)
        metrics[nested] = cb.measure(net, x, y, idx)
        ref = robust_accuracy_counts(net, split_batches(x, y, 8, idx), cb.specs, nested=nested)
        assert all(metrics[nested][cb.metric_name(s)] == ref[s.key][0] / 30 for s in cb.specs)
        assert metrics[nested]["adv/nested"] == float(nested)
    assert lines == []  # a short measurement prints no progress
    names = [k for k in metrics[True] if "/eps" in k]
    assert all(metrics[True][k] <= metrics[False][k] for k in names)
    assert metrics[True]["adv/n_grad"] < metrics[False]["adv/n_grad"]
    cb = AdversarialAccuracy(eps=[0.0, 0.05], batch_size=8, pgd_steps=3, progress_every_s=1e-9)
    cb.specs = cb.build_specs(None)
    cb.measure(net, x, y, idx)
    assert len(lines) == 4 * 4  # 4 batches x 4 attack-eps, each line after a time > 1e-9 s
    assert lines[-1].startswith("[AdversarialAccuracy] 16/16 ") and "batch 4: pgd_linf_eps0.05" in lines[-1]


@pytest.mark.usefixtures("one_thread")
def test_adversarial_callback_runs_final_attacks_only_at_the_final_measurement():
    """``final_attacks`` (APGD-CE, APGD-T) join the grid at the final measurement only; the epoch-end
    keys keep their values there, ``worst`` stays FGSM/PGD, ``autoattack`` is robust to all four."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).eval()
    x, idx = torch.rand(24, 1, 6, 6), torch.arange(24)
    with torch.no_grad():
        y = torch.where(idx % 4 == 0, idx % 10, net(x).argmax(1))
    cb = AdversarialAccuracy(
        eps=[0.0, 0.05, 0.2], batch_size=8, pgd_steps=3, final_attacks=["apgdce", "apgdt"], apgd_steps=5,
        apgd_target_classes=2,
    )  # fmt: skip
    cb.specs, cb.final_specs = cb.build_specs(None), cb.build_specs(None, final=True)
    assert [s.name for s in cb.final_specs[-3:]] == ["apgdt"] * 3 and cb.final_specs[-1].steps == 5
    cb._data = (x, y, idx)
    trainer = types.SimpleNamespace(
        max_epochs=3, current_epoch=1, max_steps=-1, global_step=10, should_stop=False
    )
    epoch = cb.measure_module(trainer, net)
    trainer.current_epoch = 2  # the last epoch: the final measurement
    final = cb.measure_module(trainer, net)
    added = set(final) - set(epoch)
    assert added == {
        f"adv/{kind}_linf/eps{e:.4g}" for kind in ("apgdce", "apgdt", "autoattack") for e in (0.0, 0.05, 0.2)
    }
    assert all(final[k] == epoch[k] for k in epoch if "/eps" in k or k == "adv/clean")
    ref = robust_accuracy_counts(net, split_batches(x, y, 8, idx), cb.final_specs)
    for e in (0.05, 0.2):
        assert final[f"adv/autoattack_linf/eps{e:.4g}"] == ref[f"autoattack_linf_eps{e:.4g}"][0] / 24
        assert final[f"adv/autoattack_linf/eps{e:.4g}"] <= final[f"adv/worst_linf/eps{e:.4g}"]
    assert final["adv/autoattack_linf/eps0.05"] < final["adv/worst_linf/eps0.05"]  # APGD broke more
    assert final["adv/n_grad"] > epoch["adv/n_grad"]


def test_callbacks_refuse_bad_settings_with_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError, match="bn_mode='batch' is invalid: allowed: eval, train"):
        HessianSpectrum(bn_mode="batch")
    with pytest.raises(ConfigError, match="every_n_epochs=0 is invalid"):
        AdversarialAccuracy(every_n_epochs=0)
    with pytest.raises(ConfigError, match="nested_eps='no' is invalid"):
        AdversarialAccuracy(nested_eps="no")
    with pytest.raises(ConfigError, match="progress_every_s=0 is invalid"):
        AdversarialAccuracy(progress_every_s=0)
    with pytest.raises(
        ConfigError, match=r"final_attacks=\['cw'\] is invalid: allowed: fgsm, pgd, apgdce, apgdt"
    ):
        AdversarialAccuracy(final_attacks=["cw"])
    with pytest.raises(ConfigError, match="not already in attacks"):
        AdversarialAccuracy(final_attacks=["pgd", "apgdce"])
    with pytest.raises(ConfigError, match="apgd_steps=0 is invalid"):
        AdversarialAccuracy(apgd_steps=0)


def test_two_instances_of_one_measurement_have_their_own_checkpoint_slot_and_names():
    a, b = HessianSpectrum(), HessianSpectrum(prefix="hessian_train_bn", bn_mode="train")
    assert a.state_key != b.state_key
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x, y = torch.rand(6, 1, 2, 2, dtype=torch.float64), torch.arange(6) % 3
    metrics = b.measure(net, nn.functional.cross_entropy, x, y)
    assert "hessian_train_bn/lambda_1" in metrics and not any(k.startswith("hessian/") for k in metrics)
