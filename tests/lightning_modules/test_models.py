"""Every model trains a few steps on data of each shape it supports; normalization is inside."""

import pytest
import torch

from lightning_modules import models

SHAPES = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}
CASES = [
    ("mlp", {}, "mnist"),
    ("mlp", {}, "cifar"),
    ("lenet", {}, "mnist"),
    ("lenet", {}, "cifar"),
    ("c1", {}, "mnist"),
    ("c1", {}, "cifar"),
    ("resnet20", {}, "mnist"),
    ("resnet20", {}, "cifar"),
    ("resnet18", {}, "cifar"),
    ("vgg", {"variant": "vgg11"}, "cifar"),
]


@pytest.mark.parametrize("name,kwargs,data", CASES)
def test_few_sgd_steps_reduce_loss_on_fixed_batch(name, kwargs, data):
    torch.manual_seed(0)
    shape = SHAPES[data]
    net = getattr(models, name)(shape, 10, mean=[0.5] * shape[0], std=[0.25] * shape[0], **kwargs)
    x, y = torch.rand(16, *shape), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert net(x).shape == (16, 10)
    assert losses[-1] < losses[0], losses  # it learns (memorizes the fixed batch)


def test_normalize_is_part_of_the_model():
    net = models.lenet((3, 32, 32), 10, mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5])
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5
    assert torch.allclose(net.normalize(x), expected)
    assert "normalize.mean" in dict(net.named_buffers())
    assert all("normalize" not in n for n, _ in net.named_parameters())


def test_c1_matches_paper_b_layout():
    net = models.c1((1, 28, 28), 10)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(64, (5, 5))] * 2
    assert [m.out_features for m in linears] == [384, 192, 10]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 2
    assert models.has_batchnorm(net)


def test_resnet20_has_paper_size():
    net = models.resnet20((3, 32, 32), 10)
    n = sum(p.numel() for p in net.parameters())
    assert 0.26e6 < n < 0.29e6, n  # He et al.: 0.27M


def test_vgg_refuses_too_small_input():
    with pytest.raises((RuntimeError, ValueError)):
        models.vgg((1, 28, 28), 10, variant="vgg11")
