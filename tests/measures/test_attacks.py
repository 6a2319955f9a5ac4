"""Attacks (``measures.pgd``) and robust-accuracy counts (``measures.attacks``) on a small BatchNorm CNN.

References are computed here (torchattacks 3.5.1, or the functions' own definitions), never
hard-coded numbers.
"""

from __future__ import annotations

import pytest
import torch

# the reference library: a test-only dependency installed with --no-deps (README, .ci/run)
import torchattacks  # noqa: E402
from torch import nn

from measures.attacks import (
    AttackSpec,
    AttackWork,
    adversarial_examples,
    robust_accuracy_counts,
    robust_masks,
    worst_case_key,
)
from measures.batches import split_batches
from measures.checks import gradient_masking_warnings
from measures.pgd import fgsm, per_sample_unit_start, pgd, pgd_fooled_at_any_iterate
from tests.helpers import attack_data as data
from tests.helpers import small_cnn

EPS_LINF = 0.1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: two OpenMP threads were ~50x slower than one on the 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EPS_L2 = 0.8


@pytest.fixture(scope="module")
def model_and_data():
    model = small_cnn()
    x, y = data()
    # Labels = the model's own predictions for two thirds of the samples, so that clean
    # accuracy is well above 0 and attacks have something to break.
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = torch.where(torch.arange(len(y)) % 3 == 0, y, pred)
    assert len(pred.unique()) > 2, "degenerate test model: (almost) one predicted class"
    return model, x, y


def snapshot(model: nn.Module) -> dict:
    return {
        "modes": [m.training for m in model.modules()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "rng": torch.get_rng_state(),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["modes"] == after["modes"]
    for a, b in zip(before["grads"], after["grads"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    for a, b in zip(before["buffers"], after["buffers"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(before["rng"], after["rng"])


# --------------------------------------------------------------------------- torchattacks


def ours_and_theirs(kind: str, model, x, y):
    steps = 5
    if kind == "fgsm":
        return fgsm(model, x, y, EPS_LINF), torchattacks.FGSM(model, eps=EPS_LINF)
    if kind == "pgd_linf":
        ours = pgd(model, x, y, EPS_LINF, 0.03, steps, norm="linf", random_start=False)
        return ours, torchattacks.PGD(model, eps=EPS_LINF, alpha=0.03, steps=steps, random_start=False)
    ours = pgd(model, x, y, EPS_L2, 0.3, steps, norm="l2", random_start=False)
    return ours, torchattacks.PGDL2(model, eps=EPS_L2, alpha=0.3, steps=steps, random_start=False)


@pytest.mark.parametrize("kind", ["fgsm", "pgd_linf", "pgd_l2"])
@pytest.mark.parametrize("torchattacks_mode", ["default", "train"])
@pytest.mark.parametrize("given", ["eval", "train"])
def test_matches_torchattacks(model_and_data, kind, given, torchattacks_mode):
    """Same adversarial inputs as torchattacks whenever the model runs in the same mode.

    torchattacks switches any given model to eval for the attack unless told
    ``set_model_training_mode(model_training=True, batchnorm_training=True)``; ours uses the
    mode the caller set, so ours runs on a model in the mode torchattacks attacks with.
    """
    _, x, y = model_and_data
    attack_in_train = torchattacks_mode == "train"  # torchattacks then trains even an eval model
    ours_model = small_cnn().train(attack_in_train)
    ours, _ = ours_and_theirs(kind, ours_model, x, y)
    their_model = small_cnn().train(given == "train")  # fresh: torchattacks may move BN stats
    _, attack = ours_and_theirs(kind, their_model, x, y)
    if torchattacks_mode == "train":
        attack.set_model_training_mode(model_training=True, batchnorm_training=True)
    theirs = attack(x, y)
    if torchattacks_mode == "default":  # it restores train mode (not eval after model_training)
        assert their_model.training == (given == "train")
    assert (ours - x).abs().max() > 0.5 * EPS_LINF  # the attack did move the inputs
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The mode matters (so the comparison above can fail): the other mode gives other inputs.
    other, _ = ours_and_theirs(kind, small_cnn().train(not attack_in_train), x, y)
    assert (other - theirs).abs().max() > 1e-3


def test_matches_torchattacks_float64():
    """In float64 the agreement is far tighter than 1e-5.

    L∞ agrees to rounding. L2 differs by ~1e-9: torchattacks averages the loss over the batch
    and adds 1e-10 to the mean-loss gradient's norm, ours sums it (batch-size independent).
    """
    model = small_cnn(dtype=torch.float64)
    x, y = data(dtype=torch.float64)
    for kind, atol in [("fgsm", 1e-12), ("pgd_linf", 1e-12), ("pgd_l2", 1e-8)]:
        ours, attack = ours_and_theirs(kind, model, x, y)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, attack(x, y), atol=atol, rtol=0)


# --------------------------------------------------------------------------- constraints and state


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_stays_in_ball_and_box(model_and_data, norm):
    model, x, y = model_and_data
    eps = EPS_LINF if norm == "linf" else EPS_L2
    g = torch.Generator().manual_seed(3)
    adv = pgd(model, x, y, eps, eps / 3, 4, norm=norm, random_start=True, generator=g)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps * (1 + 1e-5)
    assert size.max() > 0.5 * eps
    assert adv.min() >= 0 and adv.max() <= 1
    # Starts come from the generator: same seed, same result; another seed, another one.
    again = pgd(model, x, y, eps, eps / 3, 4, norm=norm, generator=torch.Generator().manual_seed(3))
    other = pgd(model, x, y, eps, eps / 3, 4, norm=norm, generator=torch.Generator().manual_seed(4))
    assert torch.equal(adv, again) and not torch.equal(adv, other)
    start_only = pgd(model, x, y, eps, eps / 3, 0, norm=norm, generator=torch.Generator().manual_seed(3))
    assert start_only.min() >= 0 and start_only.max() <= 1 and not torch.equal(start_only, x)
    start_delta = (start_only - x).flatten(1)
    start_size = start_delta.abs().amax(1) if norm == "linf" else start_delta.norm(dim=1)
    assert start_size.max() <= eps * (1 + 1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_sample_start(norm):
    """Unit-eps starts: inside the unit ball, a function of (seed, idx) only, not degenerate."""
    x = torch.rand(64, 3, 8, 8)
    idx = torch.arange(100, 164)
    unit = per_sample_unit_start(x, idx, seed=1, norm=norm)
    assert unit.shape == x.shape and unit.dtype == x.dtype
    flat = unit.flatten(1)
    size = flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)
    assert size.max() <= 1 + 1e-6
    if norm == "linf":
        assert size.min() > 0.9 and abs(flat.mean()) < 0.02 and abs(flat.std() - 3**-0.5) < 0.02
    else:  # radius uniform in [0, 1], direction uniform
        assert size.min() < 0.2 and size.max() > 0.8 and abs(size.mean() - 0.5) < 0.1
        assert abs((flat / size[:, None]).mean(0)).max() < 0.5
    # The same sample gets the same start wherever it sits; other samples/seeds differ.
    assert torch.equal(per_sample_unit_start(x[5:9], idx[5:9], 1, norm), unit[5:9])
    assert torch.equal(per_sample_unit_start(x[[9, 2]], idx[[9, 2]], 1, norm), unit[[9, 2]])
    assert not torch.equal(per_sample_unit_start(x, idx, 2, norm), unit)
    assert not torch.equal(unit[0], unit[1])
    x64 = x.double()
    torch.testing.assert_close(per_sample_unit_start(x64, idx, 1, norm).float(), unit)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_state_unchanged(mode):
    """Mode flags, .grad (preset and None), BN statistics and the global RNG come back as found.

    In train mode the BatchNorm statistics would move and the Dropout would draw from the
    global RNG on every forward, so both are really exercised.
    """
    model = nn.Sequential(small_cnn(), nn.Dropout(0.2))
    model.train(mode == "train")
    model[0][5].train(mode != "train")  # a mixed-mode model: flags must come back per submodule
    x, y = data(16)
    model[0][0].weight.grad = torch.randn_like(model[0][0].weight)  # preset non-None grad
    before = snapshot(model)
    assert before["grads"].count(None) == len(before["grads"]) - 1
    spec = AttackSpec("pgd", EPS_LINF, steps=3)
    for run in (
        lambda: fgsm(model, x, y, EPS_LINF),
        lambda: pgd(model, x, y, EPS_L2, 0.2, 3, norm="l2", generator=torch.Generator().manual_seed(0)),
        lambda: pgd(model, x, y, EPS_LINF, 0.03, 3),
        lambda: adversarial_examples(model, x, y, spec, generator=torch.Generator().manual_seed(0)),
        lambda: robust_accuracy_counts(model, [(x, y, torch.arange(16))], [spec, AttackSpec("fgsm", 0.1)]),
    ):
        run()
        assert_same_state(before, snapshot(model))
    # The checks can fail: a plain forward moves what the attacks must leave alone.
    with torch.no_grad():
        model(x)
    moved = snapshot(model)
    assert (mode == "train") == (not torch.equal(before["buffers"][0], moved["buffers"][0]))
    assert (mode == "train") == (not torch.equal(before["rng"], moved["rng"]))


def test_works_under_no_grad_and_inference_mode(model_and_data):
    model, x, y = model_and_data
    reference = pgd(model, x, y, EPS_LINF, 0.03, 3, random_start=False)
    specs = [AttackSpec("fgsm", EPS_LINF), AttackSpec("pgd", EPS_LINF, steps=3)]
    counts = robust_accuracy_counts(model, [(x, y, torch.arange(len(x)))], specs)
    with torch.no_grad():
        assert torch.equal(pgd(model, x, y, EPS_LINF, 0.03, 3, random_start=False), reference)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors
        assert xi.is_inference()
        assert torch.equal(pgd(model, xi, yi, EPS_LINF, 0.03, 3, random_start=False), reference)
        assert torch.equal(fgsm(model, xi, yi, EPS_LINF), fgsm(model, x, y, EPS_LINF))
        idx = torch.arange(len(x))  # an inference tensor too
        assert robust_accuracy_counts(model, [(xi, yi, idx)], specs) == counts


# --------------------------------------------------------------------------- robust accuracy counts

SPECS = [
    AttackSpec("fgsm", 0.0),
    AttackSpec("fgsm", 0.05),
    AttackSpec("fgsm", EPS_LINF),
    AttackSpec("pgd", 0.0, steps=4),
    AttackSpec("pgd", 0.05, steps=4),
    AttackSpec("pgd", EPS_LINF, steps=4),
    AttackSpec("pgd", EPS_L2, norm="l2", steps=4),
]


@pytest.mark.parametrize("nested", [True, False])
def test_counts_invariant_to_batching_and_order(model_and_data, nested):
    model, x, y = model_and_data
    idx = torch.arange(len(x))
    work = AttackWork()
    whole = robust_accuracy_counts(model, [(x, y, idx)], SPECS, seed=5, nested=nested, work=work)
    assert whole["clean"][1] == len(x) and 0 < whole["clean"][0] < len(x)
    assert all(whole[s.key][1] == len(x) for s in SPECS)
    for bs in (1, 7, 20):
        again = AttackWork()
        batches = split_batches(x, y, bs, idx)
        assert robust_accuracy_counts(model, batches, SPECS, seed=5, nested=nested, work=again) == whole
        assert again == work  # the work is counted per sample, so it does not depend on batching either
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    shuffled = split_batches(x[perm], y[perm], 11, idx[perm])
    assert robust_accuracy_counts(model, shuffled, SPECS, seed=5, nested=nested) == whole
    # The random start matters: without idx-tied noise the counts could not stay fixed.
    per_seed = {
        tuple(robust_accuracy_counts(model, [(x, y, idx)], SPECS[3:6], seed=s, nested=nested).values())
        for s in range(6)
    }
    assert len(per_seed) > 1


def test_eps_zero_equals_clean_and_sanity_checks(model_and_data):
    model, x, y = model_and_data
    counts = robust_accuracy_counts(model, [(x, y, torch.arange(len(x)))], SPECS)
    assert counts[SPECS[0].key] == counts["clean"] == counts[SPECS[3].key]
    assert counts[SPECS[2].key][0] < counts["clean"][0]  # the attack breaks something
    assert gradient_masking_warnings(counts, SPECS) == []
    # Contrived masking: accuracy rising with eps, PGD above FGSM, eps=0 off clean.
    bad = dict(counts)
    n = len(x)
    bad[SPECS[5].key] = (n, n)
    bad[SPECS[3].key] = (counts["clean"][0] - 1, n)
    warnings = gradient_masking_warnings(bad, SPECS)
    assert any("eps=0" in w for w in warnings)
    assert any("rise with eps" in w and SPECS[5].key in w for w in warnings)
    assert any("FGSM" in w and SPECS[5].key in w for w in warnings)


def test_counts_match_the_attack_functions(model_and_data):
    """Full-computation counts equal accuracy on the public fgsm/pgd outputs (no random start)."""
    model, x, y = model_and_data
    specs = [AttackSpec("fgsm", EPS_LINF), AttackSpec("pgd", EPS_L2, norm="l2", steps=4, random_start=False)]
    counts = robust_accuracy_counts(
        model, split_batches(x, y, 16, torch.arange(len(x))), specs, early_exit=False
    )
    with torch.no_grad():
        fgsm_ok = (model(fgsm(model, x, y, EPS_LINF)).argmax(1) == y).sum().item()
        adv = pgd(model, x, y, EPS_L2, specs[1].alpha, 4, norm="l2", random_start=False)
        pgd_ok = (model(adv).argmax(1) == y).sum().item()
    assert counts[specs[0].key] == (fgsm_ok, len(x))
    assert counts[specs[1].key] == (pgd_ok, len(x))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_early_exit_equals_any_iterate_and_bounds_full(model_and_data, norm):
    """Early exit = "correct at clean and at every iterate", computed here from pgd(steps=k)."""
    model, x, y = model_and_data
    eps, steps = (0.05, 6) if norm == "linf" else (0.5, 6)
    spec = AttackSpec("pgd", eps, norm=norm, steps=steps, random_start=False)
    batches = split_batches(x, y, 16, torch.arange(len(x)))
    early = robust_accuracy_counts(model, batches, [spec], early_exit=True)[spec.key]
    full = robust_accuracy_counts(model, batches, [spec], early_exit=False)[spec.key]
    robust = torch.ones(len(x), dtype=torch.bool)
    with torch.no_grad():
        robust &= model(x).argmax(1) == y
        for k in range(steps + 1):
            adv = pgd(model, x, y, eps, spec.alpha, k, norm=norm, random_start=False)
            ok_k = model(adv).argmax(1) == y
            robust &= ok_k
        final_ok = ok_k
    assert early == (robust.sum().item(), len(x))
    assert full == (final_ok.sum().item(), len(x))
    assert early[0] <= full[0]
    # With random starts: the bound holds for every attack.
    e = robust_accuracy_counts(model, batches, SPECS, early_exit=True, seed=2)
    f = robust_accuracy_counts(model, batches, SPECS, early_exit=False, seed=2)
    assert all(e[k][0] <= f[k][0] for k in e) and e["clean"] == f["clean"]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_early_exit_with_and_without_compaction_both_equal_the_any_iterate_reference(model_and_data, norm):
    """Dropping fooled samples from the batch (CPU default) or keeping every sample and collecting a
    mask (the GPU default) is a speed choice only: both = "fooled at some iterate", computed from
    pgd(steps=k) for every k. Compaction does less work."""
    model, x, y = model_and_data
    model.eval()
    eps, alpha, steps = (0.05, 0.02, 6) if norm == "linf" else (0.5, 0.2, 6)
    fooled = torch.zeros(len(x), dtype=torch.bool)
    with torch.no_grad():
        for k in range(steps + 1):
            adv = pgd(model, x, y, eps, alpha, k, norm=norm, random_start=False)
            fooled |= model(adv).argmax(1) != y
    assert 0 < int(fooled.sum()) < len(x)
    works = {}
    for compact in (True, False):
        works[compact] = AttackWork()
        with torch.enable_grad():
            got = pgd_fooled_at_any_iterate(model, x, y, x, eps, alpha, steps, norm, works[compact], compact)
        assert torch.equal(got, fooled), compact
    assert works[False].gradients == len(x) * steps
    assert works[True].gradients < works[False].gradients


def test_adversarial_examples_dispatch(model_and_data):
    model, x, y = model_and_data
    fg = AttackSpec("fgsm", EPS_LINF)
    assert torch.equal(adversarial_examples(model, x, y, fg), fgsm(model, x, y, EPS_LINF))
    spec = AttackSpec("pgd", EPS_L2, norm="l2", steps=3)
    got = adversarial_examples(model, x, y, spec, generator=torch.Generator().manual_seed(9))
    want = pgd(model, x, y, EPS_L2, spec.alpha, 3, norm="l2", generator=torch.Generator().manual_seed(9))
    assert torch.equal(got, want)
    assert torch.equal(adversarial_examples(model, x, y, AttackSpec("pgd", 0.0)), x)


def test_spec_validation_and_keys():
    assert AttackSpec("pgd", 0.1).key == "pgd_linf_eps0.1"
    assert AttackSpec("fgsm", 8 / 255).key == "fgsm_linf_eps0.03137"
    assert AttackSpec("pgd", 0.5, norm="l2", tag="40steps").key == "pgd_l2_eps0.5_40steps"
    for bad in (
        dict(name="cw", eps=0.1),
        dict(name="fgsm", eps=0.1, norm="l2"),
        dict(name="pgd", eps=-0.1),
        dict(name="pgd", eps=0.1, steps=-1),
        dict(name="pgd", eps=0.1, norm="l1"),
    ):
        with pytest.raises(ValueError):
            AttackSpec(**bad)
    with pytest.raises(ValueError, match="unique"):
        robust_accuracy_counts(small_cnn(), [], [AttackSpec("pgd", 0.1), AttackSpec("pgd", 0.1, steps=20)])


# --------------------------------------------------------------------------- nested eps


class Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(20 * x)


def wavy_model_and_data():
    """An MLP with a sine activation: its decisions oscillate along a ray, so an attack that
    breaks a sample at a small eps can miss it at a larger one (the small CNN is too linear)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 32), Sine(), nn.Linear(32, 10)).eval()
    x, y = data()
    with torch.no_grad():
        pred = model(x).argmax(1)
    return model, x, torch.where(torch.arange(len(y)) % 3 == 0, y, pred)


LINF_GRID = [0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
L2_GRID = [0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
NESTED_SPECS = (
    [AttackSpec("fgsm", e) for e in LINF_GRID]
    + [AttackSpec("pgd", e, steps=3) for e in LINF_GRID]
    + [AttackSpec("pgd", e, norm="l2", steps=3) for e in L2_GRID]
)
FAMILIES = {
    "fgsm": NESTED_SPECS[: len(LINF_GRID)],
    "pgd_linf": NESTED_SPECS[len(LINF_GRID) : 2 * len(LINF_GRID)],
    "pgd_l2": NESTED_SPECS[2 * len(LINF_GRID) :],
}


class PassCounter:
    """Counts the samples that go through the model (forward hook) and back (backward hook),
    independently of the counts the attack code keeps."""

    def __init__(self, model: nn.Module):
        self.forward_rows = self.backward_rows = 0
        self.handles = [
            model.register_forward_hook(self._forward),
            model.register_full_backward_hook(self._backward),
        ]

    def _forward(self, module, inputs, output) -> None:
        self.forward_rows += len(inputs[0])

    def _backward(self, module, grad_input, grad_output) -> None:
        self.backward_rows += len(grad_output[0])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("early_exit", [True, False])
def test_nested_broken_set_is_the_union_of_per_eps_broken_sets_and_costs_fewer_passes(early_exit):
    model, x, y = wavy_model_and_data()
    idx = torch.arange(len(x))
    masks, work, counted = {}, {}, {}
    for nested in (True, False):
        work[nested] = AttackWork()
        counter = PassCounter(model)
        masks[nested] = robust_masks(
            model, x, y, idx, NESTED_SPECS, seed=1, early_exit=early_exit, nested=nested, work=work[nested]
        )
        counter.remove()
        counted[nested] = (counter.backward_rows, counter.forward_rows)
    per_eps, nested = masks[False], masks[True]
    clean_ok = per_eps["clean"]
    assert 0 < clean_ok.sum() < len(x) and torch.equal(nested["clean"], clean_ok)
    non_monotone = {}
    for family, specs in FAMILIES.items():
        broken = torch.stack([~per_eps[s.key] for s in specs])  # per eps: (eps, sample)
        # Some sample is broken at a small eps but not at a larger one: nesting changes something.
        non_monotone[family] = bool((broken[:-1].cummax(0).values & ~broken[1:]).any())
        union = (~clean_ok) | broken.cummax(0).values  # broken at some eps <= this one, or at clean
        for i, spec in enumerate(specs):
            assert torch.equal(~nested[spec.key], union[i]), spec.key
            assert nested[spec.key].sum() <= per_eps[spec.key].sum()
    assert non_monotone["fgsm"] and (early_exit or non_monotone["pgd_linf"]), non_monotone
    assert any(nested[s.key].sum() < per_eps[s.key].sum() for s in NESTED_SPECS)
    # Worst case over FGSM and PGD L-inf: robust to both at every eps <= this one (nested).
    for i, eps in enumerate(LINF_GRID):
        both = FAMILIES["fgsm"][: i + 1] + FAMILIES["pgd_linf"][: i + 1]
        want = torch.stack([nested[s.key] for s in both]).all(0)
        assert torch.equal(nested[worst_case_key("linf", eps)], want)
        same_eps = [FAMILIES["fgsm"][i], FAMILIES["pgd_linf"][i]]
        assert torch.equal(
            per_eps[worst_case_key("linf", eps)], torch.stack([per_eps[s.key] for s in same_eps]).all(0)
        )
    assert worst_case_key("l2", 0.5) not in nested  # one family of that norm: no worst case
    # Fewer passes through the model, as counted by hooks on the model and by the attack code (a
    # batch's backward pass also carries the samples fooled at that iterate, with a zero gradient).
    for n in (True, False):
        backward_rows, forward_rows = counted[n]
        assert forward_rows == work[n].passes and work[n].gradients <= backward_rows
        assert backward_rows <= work[n].gradients + (work[n].forwards if early_exit else 0)
    assert counted[True][0] < counted[False][0] and counted[True][1] < counted[False][1]
    assert work[True].gradients < work[False].gradients and work[True].forwards < work[False].forwards


def test_nested_counts_are_the_masks_summed_and_never_rise_with_eps(model_and_data):
    model, x, y = wavy_model_and_data()
    batches = split_batches(x, y, 13, torch.arange(len(x)))
    counts = robust_accuracy_counts(model, batches, NESTED_SPECS, seed=1)
    masks = robust_masks(model, x, y, torch.arange(len(x)), NESTED_SPECS, seed=1)
    assert counts == {k: (int(m.sum()), len(x)) for k, m in masks.items()}
    for specs in FAMILIES.values():
        values = [counts[s.key][0] for s in specs]
        assert values == sorted(values, reverse=True)
    assert gradient_masking_warnings(counts, NESTED_SPECS) == []
    # Each eps on its own, the same model rises with eps somewhere (which the check flags).
    per_eps = robust_accuracy_counts(model, batches, NESTED_SPECS, seed=1, nested=False)
    assert any("rise with eps" in w for w in gradient_masking_warnings(per_eps, NESTED_SPECS))


def test_progress_reports_every_attack_and_eps_of_every_batch(model_and_data):
    model, x, y = model_and_data
    calls = []
    batches = split_batches(x, y, 20, torch.arange(len(x)))  # 3 batches
    robust_accuracy_counts(model, batches, SPECS, progress=lambda *a: calls.append(a))
    total = 3 * len(SPECS)
    assert [(done, t) for done, t, _ in calls] == [(i, total) for i in range(1, total + 1)]
    assert all(spec.key in message for (_, _, message), spec in zip(calls, SPECS * 3, strict=False))
    assert calls[-1][2].startswith("batch 3: ")
