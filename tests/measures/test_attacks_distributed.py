"""Robust-accuracy counts under a 2-process gloo group equal the 1-process counts.

Each rank holds an unequal part of the evaluation set (with the samples' indices), batched
differently from the reference, and random starts are on: the counts can only agree if
every sample's start depends on its index alone and the counts are summed over ranks. With
nested eps, which samples are attacked at an eps depends on the smaller eps: the counts and
the work (:class:`AttackWork`) must still agree. APGD-CE and APGD-T are among the attacks (their
own starts per sample and per run, their early exit, the ``autoattack`` keys).
"""

from __future__ import annotations

import torch

from measures.attacks import AttackSpec, AttackWork, robust_accuracy_counts
from measures.batches import split_batches
from tests.helpers import attack_data as data
from tests.helpers import run_in_process_group, small_cnn

SPECS = [
    AttackSpec("fgsm", 0.05),
    AttackSpec("pgd", 0.0, steps=3),
    AttackSpec("pgd", 0.05, steps=3),
    AttackSpec("pgd", 0.1, steps=3),
    AttackSpec("pgd", 0.8, norm="l2", steps=3),
    # AutoAttack's APGD (few iterations and targets: the per-sample starts and early exit are tested)
    AttackSpec("apgdce", 0.05, steps=6),
    AttackSpec("apgdce", 0.1, steps=6),
    AttackSpec("apgdt", 0.05, steps=6, n_target_classes=3),
    AttackSpec("apgdce", 0.8, norm="l2", steps=6),
]
N = 40
SEED = 7


def evaluation_set():
    """The small CNN and data of the function tests, labels partly the model's predictions."""
    model = small_cnn()
    x, y = data(N)
    with torch.no_grad():
        pred = model(x).argmax(1)
    return model, x, torch.where(torch.arange(N) % 3 == 0, y, pred)


def evaluate(model, batches, early_exit: bool, nested: bool) -> tuple[dict, AttackWork]:
    work = AttackWork()
    counts = robust_accuracy_counts(
        model, batches, SPECS, seed=SEED, early_exit=early_exit, nested=nested, work=work
    )
    return counts, work


def counts_on_rank(rank: int, world: int, configs: list[tuple[list[int], int, bool, bool]]) -> list:
    """For each (bounds, batch_size, early_exit, nested): this rank evaluates ``bounds[rank]:bounds[rank+1]``."""
    model, x, y = evaluation_set()
    results = []
    for bounds, batch_size, early_exit, nested in configs:
        idx = torch.arange(N)[bounds[rank] : bounds[rank + 1]]
        results.append(evaluate(model, split_batches(x[idx], y[idx], batch_size, idx), early_exit, nested))
    return results


def test_two_ranks_equal_one_process():
    modes = [(early, nested) for early in (True, False) for nested in (True, False)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors (the workers run with one thread too)
    try:
        model, x, y = evaluation_set()
        reference = {mode: evaluate(model, [(x, y, torch.arange(N))], *mode) for mode in modes}
    finally:
        torch.set_num_threads(threads)
    assert 0 < reference[True, True][0]["clean"][0] < N
    counts = reference[True, True][0]
    assert counts["autoattack_linf_eps0.05"][0] < counts["worst_linf_eps0.05"][0]  # APGD breaks more here
    # Nesting did something here (fewer passes), so its batching and rank invariance is tested.
    assert reference[True, True][1].passes < reference[True, False][1].passes
    # Unequal shards (rank 1 gets 3x as many) batched in 6s, and an empty shard on rank 1.
    configs = [(bounds, 6, *mode) for bounds in ([0, 10, N], [0, N, N]) for mode in modes]
    rank0, rank1 = run_in_process_group(counts_on_rank, configs)
    for config, got0, got1 in zip(configs, rank0, rank1, strict=True):
        # counts and work summed over ranks: the same on both ranks, and as on one process
        assert got0 == got1 == reference[config[2:]], config
