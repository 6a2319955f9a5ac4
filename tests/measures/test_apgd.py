"""APGD-CE and APGD-T (``measures.apgd``) against torchattacks 3.5.1, and in the robust-accuracy counts.

torchattacks draws its random starts from the global RNG inside the attack (one draw per run, for
the samples it attacks). To hand it the start ours gets, its module's ``torch`` is replaced, for
one test, by a stand-in whose ``rand``/``randn`` return the draws the test chose (everything else
is torch's); ours is given the start that torchattacks computes from those draws, by
torchattacks' own formula (:func:`torchattacks_start`).
"""

from __future__ import annotations

import types

import pytest
import torch

# the reference library: a test-only dependency installed with --no-deps (README, .ci/run)
import torchattacks  # noqa: E402
import torchattacks.attacks.apgd as ta_apgd  # noqa: E402
import torchattacks.attacks.apgdt as ta_apgdt  # noqa: E402
from torch import nn

from lightning_modules.data import load_mnist5k
from lightning_modules.models import mlp
from measures.apgd import apgd, apgd_robust, apgd_rows, apgd_single_run, apgd_targeted, apgd_unit_start
from measures.attacks import (
    AttackSpec,
    AttackWork,
    autoattack_key,
    robust_accuracy_counts,
    robust_masks,
    worst_case_key,
)
from measures.batches import split_batches
from tests.helpers import attack_data, small_cnn

NORMS = {"linf": "Linf", "l2": "L2"}
EPS = {"linf": 0.02, "l2": 0.3}  # the small CNN: some samples robust, some not
N_ITER = 30  # checkpoints at 6, 11, 15, ... iterations: several halvings happen


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_and_data():
    """The small BatchNorm CNN of the attack tests, labels partly its own predictions."""
    model = small_cnn()
    x, y = attack_data(48)
    with torch.no_grad():
        pred = model(x).argmax(1)
    return model, x, torch.where(torch.arange(len(y)) % 3 == 0, y, pred)


class TorchWithDraws(types.ModuleType):
    """``torch``, except that ``rand``/``randn`` hand out the queued tensors in order."""

    def __init__(self, draws: list[torch.Tensor]):
        super().__init__("torch")
        self.draws = draws

    def __getattr__(self, name):
        return getattr(torch, name)

    def rand(self, *args, **kwargs):
        return self.draws.pop(0)

    randn = rand


def draw(x: torch.Tensor, norm: str, g: torch.Generator) -> torch.Tensor:
    """What torchattacks' ``torch.rand`` (L∞) or ``torch.randn`` (L2) would return."""
    return torch.rand(x.shape, generator=g) if norm == "linf" else torch.randn(x.shape, generator=g)


def torchattacks_start(x: torch.Tensor, eps: float, r: torch.Tensor, norm: str) -> torch.Tensor:
    """torchattacks' start from the draw ``r`` (``APGD.attack_single_run``, verbatim)."""
    ones = torch.ones([x.shape[0], 1, 1, 1])
    if norm == "linf":
        t = 2 * r - 1
        size = t.reshape([t.shape[0], -1]).abs().max(dim=1, keepdim=True)[0].reshape([-1, 1, 1, 1])
        return (x + eps * ones * t / size).clamp(0.0, 1.0)
    return (x + eps * ones * r / ((r**2).sum(dim=(1, 2, 3), keepdim=True).sqrt() + 1e-12)).clamp(0.0, 1.0)


def torchattacks_apgdt(model, x, y, eps, norm, n_targets, draws) -> torch.Tensor:
    """torchattacks' APGDT, each target's run started from ``draws[target][its samples]``.

    It attacks only the samples still robust, so the stand-in RNG must hand out those rows: the
    wrapped single run finds them by matching its inputs against ``x``.
    """
    attack = torchattacks.APGDT(model, norm=NORMS[norm], eps=eps, steps=N_ITER, n_classes=n_targets + 1)
    queue: list[torch.Tensor] = []
    single_run = attack.attack_single_run

    def run_from_our_draws(x_to_fool, y_to_fool):
        rows = (x_to_fool.flatten(1)[:, None] == x.flatten(1)[None]).all(-1).int().argmax(1)
        queue.append(draws[attack.target_class - 2][rows])
        return single_run(x_to_fool, y_to_fool)

    attack.attack_single_run = run_from_our_draws
    ta_apgdt.torch = TorchWithDraws(queue)
    try:
        return attack(x, y)
    finally:
        ta_apgdt.torch = torch


def fooled(model, adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(adv).argmax(1) != y


# --------------------------------------------------------------------------- against torchattacks


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_ce_equals_torchattacks_from_the_same_start(model_and_data, norm, monkeypatch):
    """Bitwise equal (no tolerance): the same float operations in the same order, in float32.

    torchattacks keeps losses and step sizes in float32 whatever the input's dtype, ours in the
    input's dtype, so only float32 is compared exactly.
    """
    model, x, y = model_and_data
    eps, g = EPS[norm], torch.Generator().manual_seed(1)
    r = draw(x, norm, g)
    ours = apgd(model, x, y, eps, norm=norm, n_iter=N_ITER, x_init=torchattacks_start(x, eps, r, norm))
    correct = ~fooled(model, x, y)
    monkeypatch.setattr(ta_apgd, "torch", TorchWithDraws([r[correct]]))  # it draws for the correct ones
    theirs = torchattacks.APGD(model, norm=NORMS[norm], eps=eps, steps=N_ITER, loss="ce")(x, y)
    assert torch.equal(ours, theirs)
    broken = fooled(model, ours, y) & correct
    assert 0 < broken.sum() < correct.sum()  # the comparison covers both outcomes


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_targeted_equals_torchattacks_from_the_same_starts(model_and_data, norm):
    """Bitwise equal, with 3 target classes (each its own start), in L∞ for the whole batch.

    In L2, torchattacks' APGDT steps every sample with the FIRST sample's step size
    (``step_size[0]``), a deviation from the paper and from AutoAttack's code, which ours does
    not copy: the batch differs, and each sample attacked on its own (a batch of one, where
    ``step_size[0]`` is its own) is bitwise equal. (Ours on a batch of one, too: the model's
    logits for a sample differ with the batch by rounding, ~6e-8 here.)
    """
    model, x, y = model_and_data
    eps, g, n_targets = EPS[norm], torch.Generator().manual_seed(2), 3
    draws = [draw(x, norm, g) for _ in range(n_targets)]
    starts = torch.stack([torchattacks_start(x, eps, r, norm) for r in draws])
    ours = apgd_targeted(
        model, x, y, eps, norm=norm, n_iter=N_ITER, n_target_classes=n_targets, x_init=starts
    )
    theirs = torchattacks_apgdt(model, x, y, eps, norm, n_targets, draws)
    assert 0 < (fooled(model, ours, y) & ~fooled(model, x, y)).sum()
    if norm == "linf":
        assert torch.equal(ours, theirs)
        return
    assert not torch.equal(ours, theirs)  # torchattacks' shared step size
    for i in range(0, len(x), 4):  # every 4th sample, to keep the test short
        one = slice(i, i + 1)
        ours_i = apgd_targeted(
            model,
            x[one],
            y[one],
            eps,
            norm=norm,
            n_iter=N_ITER,
            n_target_classes=n_targets,
            x_init=starts[:, one],
        )
        theirs_i = torchattacks_apgdt(model, x[one], y[one], eps, norm, n_targets, [d[one] for d in draws])
        assert torch.equal(ours_i, theirs_i), i


@pytest.mark.parametrize(("norm", "loss"), [("linf", "ce"), ("l2", "ce"), ("linf", "dlr_targeted")])
def test_every_iterate_equals_torchattacks_single_run(model_and_data, norm, loss, monkeypatch):
    """Every point the attack evaluates the model at, and the run's outputs, bitwise equal.

    (APGD-T in L2 is compared sample by sample in the test above: torchattacks' shared step size.)

    The inputs of every forward pass are recorded by a hook, for ours and for torchattacks'
    ``attack_single_run`` (APGDT's first pass is its clean pass for the target ranks). With
    ``early_exit`` a sample stops at the first iterate that fools the model: the same samples
    are robust.
    """
    model, x, y = model_and_data
    eps, g = EPS[norm], torch.Generator().manual_seed(3)
    r = draw(x, norm, g)
    start = torchattacks_start(x, eps, r, norm)
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach().clone()))
    try:
        if loss == "ce":
            attack = torchattacks.APGD(model, norm=NORMS[norm], eps=eps, steps=N_ITER, loss="ce")
            module, y_target = ta_apgd, None
        else:
            attack = torchattacks.APGDT(model, norm=NORMS[norm], eps=eps, steps=N_ITER)
            attack.target_class = 3  # the class ranked third at clean
            module, y_target = ta_apgdt, model(x).sort(dim=1)[1][:, -3]
            seen.clear()
        ours = apgd_single_run(model, x, y, start, eps, norm=norm, n_iter=N_ITER, y_target=y_target)
        ours_seen = list(seen)
        seen.clear()
        monkeypatch.setattr(module, "torch", TorchWithDraws([r]))
        x_best, robust, loss_best, x_fooled = attack.attack_single_run(x, y)
    finally:
        hook.remove()
    theirs_seen = seen[1:] if loss != "ce" else seen
    assert len(ours_seen) == len(theirs_seen) == N_ITER + 1  # the start and every iterate
    for k, (a, b) in enumerate(zip(ours_seen, theirs_seen, strict=True)):
        assert torch.equal(a, b), f"iterate {k}"
    assert torch.equal(ours.x_best, x_best) and torch.equal(ours.loss_best, loss_best)
    assert torch.equal(ours.robust, robust) and torch.equal(ours.x_fooled, x_fooled)
    assert 0 < robust.sum() < len(x)
    assert not torch.equal(ours_seen[-1], ours.x_best)  # a best point that is not the last iterate
    early = apgd_single_run(
        model, x, y, start, eps, norm=norm, n_iter=N_ITER, y_target=y_target, early_exit=True
    )
    assert torch.equal(early.robust, ours.robust)
    assert torch.equal(early.x_best[robust], ours.x_best[robust])  # the robust ones ran in full


def test_targets_are_the_next_classes_and_capped(model_and_data):
    """APGD-T's default is 9 target classes; with 10 classes that is every other class."""
    model, x, y = model_and_data
    idx = torch.arange(len(x))
    work = {n: AttackWork() for n in (9, 20)}
    masks = {
        n: apgd_robust(
            model, x, y, idx, 0.02, targeted=True, norm="linf", n_iter=5, n_target_classes=n, work=work[n]
        )
        for n in (9, 20)
    }
    assert torch.equal(masks[9], masks[20]) and work[9] == work[20]
    with pytest.raises(ValueError, match="4 classes"):
        apgd_targeted(nn.Sequential(nn.Flatten(), nn.Linear(144, 3)), x, y.clamp(max=2), 0.02, n_iter=2)


def test_state_rng_and_inference_mode(model_and_data):
    """Model mode, .grad, buffers and the global RNG as found; the same result under inference mode."""
    model, x, y = model_and_data
    model.train()  # the attack runs in the mode given: here train, BatchNorm statistics must not move
    model[0].weight.grad = torch.ones_like(model[0].weight)
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    try:
        a = apgd_targeted(model, x, y, 0.02, n_iter=5, n_target_classes=2)
        b = apgd(model, x, y, 0.3, norm="l2", n_iter=5)
        assert model.training and torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
        assert all(torch.equal(u, v) for u, v in zip(buffers, model.buffers(), strict=True))
        assert torch.equal(rng, torch.get_rng_state())
        with torch.inference_mode():
            xi, yi = x.clone(), y.clone()
            assert torch.equal(apgd_targeted(model, xi, yi, 0.02, n_iter=5, n_target_classes=2), a)
            assert torch.equal(apgd(model, xi, yi, 0.3, norm="l2", n_iter=5), b)
    finally:
        model.eval()
        model[0].weight.grad = None


# --------------------------------------------------------------------------- in the robust-accuracy counts

GRID = [0.0, 0.01, 0.02]
SPECS = [
    AttackSpec(name, eps, steps=steps, n_target_classes=3)
    for name, steps in (("fgsm", None), ("pgd", 5), ("apgdce", 10), ("apgdt", 10))
    for eps in GRID
]


def test_spec_defaults_keys_and_validation():
    assert AttackSpec("apgdce", 0.1).steps == 100 and AttackSpec("pgd", 0.1).steps == 10
    assert AttackSpec("apgdt", 0.1) == AttackSpec("apgdt", 0.1, steps=100, n_target_classes=9)
    assert AttackSpec("apgdce", 0.1).key == "apgdce_linf_eps0.1"
    assert AttackSpec("apgdt", 0.5, norm="l2").key == "apgdt_l2_eps0.5"
    assert autoattack_key("linf", 0.1) == "autoattack_linf_eps0.1"
    for bad in (dict(step_size=0.01), dict(steps=0), dict(n_target_classes=0)):
        with pytest.raises(ValueError):
            AttackSpec("apgdt", 0.1, **bad)


@pytest.mark.parametrize("early_exit", [True, False])
def test_counts_invariant_to_batching_and_order(model_and_data, early_exit):
    """Each sample's starts come from (seed, its index): any batching gives the same counts and work."""
    model, x, y = model_and_data
    idx = torch.arange(len(x))
    work = AttackWork()
    whole = robust_accuracy_counts(model, [(x, y, idx)], SPECS, seed=4, early_exit=early_exit, work=work)
    batches = split_batches(x.flip(0), y.flip(0), 13, idx.flip(0))  # other batches, other order
    again = AttackWork()
    assert robust_accuracy_counts(model, batches, SPECS, seed=4, early_exit=early_exit, work=again) == whole
    assert again == work
    assert whole[autoattack_key("linf", 0.02)][0] < whole[worst_case_key("linf", 0.02)][0]


@pytest.mark.parametrize("name", ["apgdce", "apgdt"])
def test_counts_equal_the_attack_functions_from_the_per_sample_starts(model_and_data, name):
    """Early-exit robust = correct on the adversarial examples of ``apgd``/``apgd_targeted`` started
    where the count starts each sample (:func:`apgd_unit_start`): an independent route."""
    model, x, y = model_and_data
    idx, eps, seed = torch.arange(100, 100 + len(x)), 0.02, 6
    spec = AttackSpec(name, eps, steps=N_ITER, n_target_classes=4)
    masks = robust_masks(model, x, y, idx, [spec], seed=seed, nested=False)
    if name == "apgdce":
        start = (x + eps * apgd_unit_start(x, idx, seed, "linf", 0)).clamp(0, 1)
        adv = apgd(model, x, y, eps, n_iter=N_ITER, x_init=start)
    else:
        starts = torch.stack(
            [(x + eps * apgd_unit_start(x, idx, seed, "linf", j)).clamp(0, 1) for j in (1, 2, 3, 4)]
        )
        adv = apgd_targeted(model, x, y, eps, n_iter=N_ITER, n_target_classes=4, x_init=starts)
    assert torch.equal(masks[spec.key], ~fooled(model, adv, y))
    assert 0 < masks[spec.key].sum() < masks["clean"].sum()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_batched_target_classes_equal_each_run_alone(norm):
    """APGD-T's target classes as rows of one batch (model calls of 5 rows), a sample leaving with all
    its runs when one is fooled, against every (sample, target class) run alone: a batch of one,
    ``apgd_single_run`` from the same start with early exit. The same samples broken; each broken
    sample's fooled runs fooled alone too, at the same first fooling iterate; every robust sample's
    best point and loss in every run. In float64: the batch changes the model's rounding only."""
    model = small_cnn(dtype=torch.float64)
    x, y = attack_data(30, seed=1, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = torch.where(torch.arange(len(y)) % 3 == 0, y, logits.argmax(1))
    keep = logits.argmax(1) == y  # the caller attacks the samples correct at clean
    x, y, logits = x[keep], y[keep], logits[keep]
    n, n_targets, seed, eps = len(x), 4, 7, EPS[norm]
    idx = torch.arange(n) + 50
    robust, rows = apgd_rows(
        model, x, y, idx, eps, targeted=True, norm=norm, n_iter=N_ITER, n_target_classes=n_targets,
        seed=seed, max_rows=5,
    )  # fmt: skip
    ranked = logits.sort(dim=1)[1]
    left_with_group = 0  # broken samples whose first run was not fooled when another one was
    for i in range(n):
        one = slice(i, i + 1)
        alone = [
            apgd_single_run(
                model, x[one], y[one], (x[one] + eps * apgd_unit_start(x[one], idx[one], seed, norm, j + 1)),
                eps, norm=norm, n_iter=N_ITER, y_target=ranked[one, -(j + 2)], early_exit=True,
            )
            for j in range(n_targets)
        ]  # fmt: skip
        assert bool(robust[i]) == all(bool(a.robust) for a in alone), i
        for j, a in enumerate(alone):
            r = j * n + i
            if robust[i]:
                assert torch.allclose(rows.x_best[r], a.x_best[0], rtol=0, atol=1e-12), (i, j)
                assert torch.allclose(rows.loss_best[r], a.loss_best[0], rtol=1e-12, atol=1e-12), (i, j)
            elif not rows.robust[r]:
                assert not a.robust, (i, j)
                assert torch.allclose(rows.x_fooled[r], a.x_fooled[0], rtol=0, atol=1e-12), (i, j)
        assert robust[i] or not rows.robust[i::n].all(), i  # a broken sample has a fooled run
        left_with_group += not robust[i] and bool(rows.robust[i])
    assert 0 < robust.sum() < n  # both outcomes
    assert left_with_group > 0  # the rows of a sample leave together


def test_per_sample_starts_are_in_the_ball_and_independent_per_run():
    x = torch.rand(32, 1, 6, 6)
    idx = torch.arange(32)
    for norm in ("linf", "l2"):
        units = [apgd_unit_start(x, idx, 0, norm, run) for run in range(3)]
        size = [u.flatten(1).abs().amax(1) if norm == "linf" else u.flatten(1).norm(dim=1) for u in units]
        assert all(torch.allclose(s, torch.ones_like(s)) for s in size)  # on the sphere, as the paper's
        assert not torch.equal(units[0], units[1]) and not torch.equal(units[1], units[2])
        assert torch.equal(apgd_unit_start(x[5:9], idx[5:9], 0, norm, 1), units[1][5:9])


# --------------------------------------------------------------------------- a trained model


@pytest.fixture(scope="module")
def trained_mlp():
    """An MLP trained for ~1 s on 4,000 embedded digits; the other 500 to attack (~89% clean)."""
    images, labels = load_mnist5k()
    x = images.float() / 255
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:4000], perm[4000:4500]
    torch.manual_seed(0)
    model = mlp((1, 28, 28), 10, hidden=(64,), mean=[0.13], std=[0.31])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        for batch in torch.randperm(4000, generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[train[batch]]), labels[train[batch]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False), x[test], labels[test]


def test_robust_accuracy_within_a_point_of_torchattacks_and_beyond_pgd(trained_mlp):
    """AutoAttack's count (APGD-CE, then APGD-T on what is left) by torchattacks, with its own random
    starts, and ours with per-sample starts: within 1 point on 500 digits at eps 0.1 (measured:
    both 106/500). APGD breaks samples that PGD-10 does not, and ``autoattack`` is robust to all."""
    model, x, y = trained_mlp
    eps = 0.1
    specs = [
        AttackSpec("fgsm", eps),
        AttackSpec("pgd", eps),
        AttackSpec("apgdce", eps),
        AttackSpec("apgdt", eps),
    ]
    masks = robust_masks(model, x, y, torch.arange(len(x)), specs)
    ce = torchattacks.APGD(model, eps=eps, steps=100, loss="ce")(x, y)
    left = ~fooled(model, ce, y)
    targeted = torchattacks.APGDT(model, eps=eps, steps=100, n_classes=10)(x[left], y[left])
    theirs = left.clone()
    theirs[left] = ~fooled(model, targeted, y[left])
    ours = masks[autoattack_key("linf", eps)]
    assert abs(int(ours.sum()) - int(theirs.sum())) <= 0.01 * len(x), (int(ours.sum()), int(theirs.sum()))
    assert torch.equal(ours, torch.stack([masks[s.key] for s in specs]).all(0))
    pgd_ok, apgd_ok = masks[specs[1].key], masks[specs[2].key] & masks[specs[3].key]
    assert (pgd_ok & ~apgd_ok).any()  # broken by APGD but not by PGD
    assert torch.equal(masks[worst_case_key("linf", eps)], masks[specs[0].key] & pgd_ok)  # FGSM/PGD only
    assert 0.1 * len(x) < ours.sum() < masks["clean"].sum()


@pytest.mark.parametrize("nested", [True, False])
def test_autoattack_is_robust_to_every_attack_and_worst_leaves_apgd_out(model_and_data, nested):
    """``autoattack``: the union of every attack's broken sets (nested: at every eps <= e);
    ``worst``: the same over FGSM and PGD only, as without APGD."""
    model, x, y = model_and_data
    idx = torch.arange(len(x))
    masks = robust_masks(model, x, y, idx, SPECS, seed=4, nested=nested)
    fast = [s for s in SPECS if s.name in ("fgsm", "pgd")]
    without_apgd = robust_masks(model, x, y, idx, fast, seed=4, nested=nested)
    for e in GRID:
        within = [s for s in SPECS if (s.eps <= e if nested else s.eps == e)]
        assert torch.equal(
            masks[autoattack_key("linf", e)], torch.stack([masks[s.key] for s in within]).all(0)
        )
        assert torch.equal(masks[worst_case_key("linf", e)], without_apgd[worst_case_key("linf", e)])
        assert autoattack_key("linf", e) not in without_apgd
    e = GRID[-1]
    assert (masks[worst_case_key("linf", e)] & ~masks[autoattack_key("linf", e)]).any()  # APGD adds some
