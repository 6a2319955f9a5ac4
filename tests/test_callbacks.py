"""The measurement callbacks: exact values, any grad mode, state restored, 1 vs 2 processes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from callbacks.adversarial import robust_accuracy_counts
from callbacks.adversarial_accuracy import AdversarialAccuracy, metric_name
from callbacks.hessian_spectrum import HessianSpectrum
from tests.conftest import FAST, records, run_train


def tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net


def exact_eigenvalues(net, x, y) -> torch.Tensor:
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(net, parts, (x,)), y)

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat0))


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
    exact = exact_eigenvalues(net.eval(), x.clone(), y.clone())
    top = exact.flip(0)[:3]
    for i in range(3):
        assert abs(metrics[f"hessian/lambda_{i + 1}"] - top[i]) <= 1e-6 * abs(top[0])
    assert abs(metrics["hessian/lambda_min"] - exact[0]) <= 1e-6 * abs(top[0])
    assert metrics["hessian/n_hvp"] > 0 and metrics["hessian/converged"] == 1.0


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_adversarial_callback_counts_match_the_function_in_any_grad_mode(grad_mode):
    net = tiny_bn_net().float().train()
    cb = AdversarialAccuracy(eps=[0.0, 0.05, 0.2], batch_size=8, pgd_steps=3)
    cb.specs = cb.build_specs("mnist5k")
    x, y, idx = torch.rand(20, 1, 6, 6), torch.arange(20) % 3, torch.arange(20) + 100
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad_mode]
    with ctx():
        metrics = cb.measure(net, x.clone(), y, idx)
    assert net.training
    ref = robust_accuracy_counts(net.eval(), [(x, y, idx)], cb.specs, seed=0)
    assert metrics["adv/clean"] == ref["clean"][0] / 20
    for spec in cb.specs:
        assert metrics[metric_name(spec)] == ref[spec.key][0] / 20
    assert metrics["adv/fgsm_linf/eps0"] == metrics["adv/clean"]


def test_callbacks_refuse_bad_settings_by_name():
    with pytest.raises(ValueError, match="hessian.bn_mode='batch'"):
        HessianSpectrum(bn_mode="batch")
    with pytest.raises(ValueError, match="adversarial.eps"):
        AdversarialAccuracy(eps=[0.1, 8])
    with pytest.raises(ValueError, match="adversarial.attacks"):
        AdversarialAccuracy(attacks=["cw"])


def test_trainer_logs_identical_measurements_on_one_and_two_processes(tmp_path):
    """ddp_spawn with 2 CPU processes vs 1: same logged hessian/... and adv/... values.

    float64 training keeps the two runs' weights equal to ~1e-15 (the only difference is
    the order of the gradient sum), so the measurements must agree to 1e-6 relative and the
    attack counts exactly. The subset sizes are odd, so the ranks hold unequal shards."""
    args = [*FAST, "model=mlp", "trainer.max_epochs=1", "trainer.precision=64-true", "optimizer.batch_size=256",
            "callbacks.hessian.subset_size=301", "callbacks.hessian.batch_size=100", "callbacks.hessian.trace=true",
            "callbacks.adversarial.subset_size=151", "callbacks.adversarial.batch_size=64",
            "callbacks.adversarial.eps=[0,0.05,0.1]"]  # fmt: skip
    run_train(args, tmp_path / "one")
    run_train([*args, "trainer=ddp_spawn", "trainer.devices=2"], tmp_path / "two")
    (one,) = records(tmp_path / "one").values()
    (two,) = records(tmp_path / "two").values()
    assert two["batch_plan"]["world_size"] == 2
    for k in ("train/loss", "train/acc", "test/acc", "train_eval/loss"):  # training itself matched
        assert abs(one["last"][k] - two["last"][k]) <= 1e-6 * abs(one["last"][k]), k
    hess = [k for k in one["last"] if k.startswith("hessian/lambda") or k == "hessian/trace"]
    adv = [k for k in one["last"] if k.startswith("adv/") and k != "adv/seconds"]
    assert len(hess) == 5 and len(adv) == 8
    for k in hess:
        assert abs(one["last"][k] - two["last"][k]) <= 1e-6 * abs(one["last"]["hessian/lambda_1"]), k
    for k in adv:
        assert one["last"][k] == two["last"][k], k
    assert one["last"]["adv/n_samples"] == 151
    # measured at every epoch end: present in the per-epoch history, not only at the end
    assert any("hessian/lambda_1" in row and row.get("epoch") == 0 for row in two["history"])
