"""HessianSpectrum's ``hvp`` and ``batch_size``: ``auto`` times both product modes once, logs and
records the choice; a model torch.func cannot run falls back (auto) or is refused before training
(forward_over_reverse); bad values are refused naming the allowed ones."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.hessian_spectrum import GGNSpectrum, HessianSpectrum
from lifecycle.loggers import RunRecord
from lifecycle.record import write_record
from lightning_modules.config import ConfigError
from tests.helpers import exact_hessian

N = 24


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CapturedStatistic(nn.Module):
    """A forward torch.func rejects: it writes an activation statistic into a plain tensor
    attribute (not a registered buffer), in place."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.mean_activation = torch.zeros(5)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        self.mean_activation.copy_(h.detach().mean(0))
        return self.b(h)


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.loss_fn, self.steps = net, nn.CrossEntropyLoss(), 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        self.steps += 1
        return self.loss_fn(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    """Fixed samples, and the un-augmented dataset a measurement callback asks for."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dataset = TensorDataset(torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g))

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=8)

    def measurement_dataset(self, split):
        return self.dataset


def fit(net: nn.Module, callback: HessianSpectrum, tmp_path):
    """One epoch with the run record as the logger: (module, record)."""
    path = tmp_path / "results.json"
    write_record(path, {"status": "running"})
    module = Classifier(net)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[callback], logger=RunRecord(path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, datamodule=Data())
    return module, json.loads(path.read_text())


def top_eigenvalue(net: nn.Module) -> float:
    x, y = Data().dataset.tensors
    return float(torch.linalg.eigvalsh(exact_hessian(net, nn.CrossEntropyLoss(), x, y))[-1])


def tanh_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_auto_times_both_modes_once_logs_and_records_the_choice(tmp_path):
    cb = HessianSpectrum(every_n_epochs=1, subset_size=None, k=2, tol=1e-6)
    assert (cb.hvp, cb.batch_size) == ("auto", "auto")
    module, record = fit(tanh_net(), cb, tmp_path)
    row = record["history"][-1]
    ms = {m: row[f"hessian/hvp_ms_{m}"] for m in ("double_backward", "forward_over_reverse")}
    assert all(t > 0 for t in ms.values())
    chosen = min(ms, key=ms.get)
    assert row["hessian/hvp_forward_over_reverse"] == float(chosen == "forward_over_reverse")
    assert record["hessian_products"] == {
        "batch_size": 250,
        "hvp": chosen,
        **{f"hvp_ms_{m}": pytest.approx(t, rel=1e-6) for m, t in ms.items()},  # logged as float32
    }
    assert abs(row["hessian/lambda_1"] - top_eigenvalue(module.net)) <= 1e-5 * abs(row["hessian/lambda_1"])
    # kept for the run: checkpointed, and the next measurement (also after a resume) does not time again
    resumed = HessianSpectrum(every_n_epochs=1, subset_size=None, k=2)
    resumed.load_state_dict(cb.state_dict())
    x, y = Data().dataset.tensors
    again = resumed.measure(module.net, nn.functional.cross_entropy, x, y)
    assert not any(k.startswith("hessian/hvp_ms") for k in again)
    assert (resumed.hvp_mode, resumed.batch_size_for(module.net, None, x, y)) == (chosen, 250)
    assert again["hessian/hvp_forward_over_reverse"] == row["hessian/hvp_forward_over_reverse"]


def test_a_model_torch_func_rejects_falls_back_under_auto_with_the_reason(tmp_path):
    cb = HessianSpectrum(every_n_epochs=1, subset_size=None, k=2, tol=1e-6)
    with pytest.warns(UserWarning, match="torch.func cannot compute forward-over-reverse products"):
        module, record = fit(CapturedStatistic(), cb, tmp_path)
    row = record["history"][-1]
    assert row["hessian/hvp_forward_over_reverse"] == 0.0 and "hessian/hvp_ms_forward_over_reverse" not in row
    note = record["hessian_products"]
    assert note["hvp"] == "double_backward" and "captured" in note["hvp_fallback_reason"]
    assert abs(row["hessian/lambda_1"] - top_eigenvalue(module.net)) <= 1e-5 * abs(row["hessian/lambda_1"])


def test_explicit_forward_over_reverse_on_such_a_model_fails_before_training(tmp_path):
    cb = HessianSpectrum(every_n_epochs=1, subset_size=None, k=2, hvp="forward_over_reverse")
    module = Classifier(CapturedStatistic())
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match="hvp='forward_over_reverse' is invalid: torch.func cannot run this model"
    ):
        trainer.fit(module, datamodule=Data())
    assert module.steps == 0


def test_bad_hvp_and_batch_size_values_are_refused_naming_the_allowed_ones():
    allowed = "allowed: auto, double_backward, forward_over_reverse"
    for kwargs, match in (
        ({"hvp": "fast"}, f"hvp='fast' is invalid: {allowed}"),
        ({"hvp": None}, f"hvp=None is invalid: {allowed}"),
        ({"batch_size": 0}, "batch_size=0 is invalid: must be a positive integer or auto"),
        ({"batch_size": "big"}, "batch_size='big' is invalid: must be a positive integer or auto"),
        (
            {"operator": "ggn", "hvp": "double_backward"},
            "hvp='double_backward' is invalid: applies to operator",
        ),
    ):
        with pytest.raises(ConfigError, match=match):
            HessianSpectrum(**kwargs)


def test_operators_without_hessian_products_ignore_hvp():
    x, y = Data().dataset.tensors
    m = GGNSpectrum(k=1, blocks=None, trace=False).measure(tanh_net(), nn.functional.cross_entropy, x, y)
    assert "ggn/lambda_1" in m and not any("hvp" in k for k in m if k != "ggn/n_hvp")
