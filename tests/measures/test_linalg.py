"""The solvers of ``measures.linalg`` and ``measures.estimators`` on plain symmetric matrices with known spectra.

Each matrix is ``Q diag(λ) Qᵀ`` with a random orthogonal ``Q`` and a chosen ``λ``; the reference is
``torch.linalg.eigvalsh`` of the same matrix (not the chosen ``λ``, so rounding is compared like
with like). The spectra cover what a Hessian shows: a few outliers over a bulk, clusters,
repeated eigenvalues and negative ones.
"""

from __future__ import annotations

import pytest
import torch

from measures.estimators import hutchinson_trace, lanczos_density, power_eigenvalues
from measures.linalg import (
    DEFAULT_TOL,
    GAP_SAFETY,
    ProgressLines,
    lanczos_eigenvalues,
    ritz_error_bounds,
    warm_start_vector,
)
from measures.operators import MatrixOperator

DIM = 60


def with_spectrum(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lam = torch.tensor(eigenvalues, dtype=torch.float64)
    bulk = torch.rand(DIM - len(lam), generator=g, dtype=torch.float64) * 0.2 - 0.05  # [-0.05, 0.15]
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.cat([lam, bulk])) @ q.T
    return (a + a.T) / 2


SPECTRA = {
    "separated": [10.0, 7.0, 5.0, 3.0, -2.0],
    "clustered": [10.0, 10.0 - 1e-4, 10.0 - 2e-4, 4.0, -1.0],
    "negative_dominant": [3.0, 2.0, 1.0, -8.0],
    "near_degenerate": [6.0, 6.0 - 1e-9, 2.0, -0.5],
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_lanczos_top_k_and_smallest_match_eigvalsh(name):
    a = with_spectrum(SPECTRA[name])
    exact = torch.linalg.eigvalsh(a)
    r = lanczos_eigenvalues(MatrixOperator(a), k=3, smallest=1, tol=1e-10, max_iter=DIM)
    scale = exact.abs().max()
    assert torch.allclose(r.eigenvalues, exact.flip(0)[:3], rtol=0, atol=1e-9 * scale), name
    assert abs(float(r.smallest[0]) - float(exact[0])) <= 1e-9 * scale
    assert r.converged and r.n_hvp == r.n_iter <= DIM
    # each Ritz value is within its residual of an exact eigenvalue
    for theta, res in zip(r.eigenvalues.tolist(), r.residuals.tolist(), strict=True):
        assert float((exact - theta).abs().min()) <= res + 1e-12 * scale


def test_repeated_eigenvalue_copies_are_recovered_once_the_krylov_space_is_exhausted():
    a = with_spectrum([5.0, 5.0, 5.0, 1.0])
    exact = torch.linalg.eigvalsh(a)
    r = lanczos_eigenvalues(MatrixOperator(a), k=4, tol=1e-10, max_iter=DIM)
    assert torch.allclose(r.eigenvalues, exact.flip(0)[:4], atol=1e-9)
    assert r.eigenvalues[:3].tolist() == pytest.approx([5.0, 5.0, 5.0], abs=1e-9)
    # with a short budget one Krylov space holds one copy: the top value is still right
    short = lanczos_eigenvalues(MatrixOperator(a), k=1, tol=1e-10, max_iter=30)
    assert abs(float(short.eigenvalues[0]) - 5.0) <= 1e-9


def test_magnitude_finds_the_dominant_negative_eigenvalue():
    a = with_spectrum(SPECTRA["negative_dominant"])
    exact = torch.linalg.eigvalsh(a)
    r = lanczos_eigenvalues(MatrixOperator(a), k=2, which="magnitude", tol=1e-10, max_iter=DIM)
    by_magnitude = exact[exact.abs().argsort(descending=True)][:2]
    assert torch.allclose(r.eigenvalues, by_magnitude, atol=1e-9)
    assert float(r.eigenvalues[0]) < 0


def test_eigenvectors_satisfy_the_eigen_equation():
    a = with_spectrum(SPECTRA["separated"])
    r = lanczos_eigenvalues(MatrixOperator(a), k=3, tol=1e-10, max_iter=DIM, return_eigenvectors=True)
    v = r.eigenvectors
    assert torch.allclose(v.T @ v, torch.eye(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(a @ v, v * r.eigenvalues, atol=1e-8)


def test_power_iteration_finds_the_top_of_a_well_separated_spectrum():
    a = with_spectrum(SPECTRA["separated"])
    exact = torch.linalg.eigvalsh(a)
    r = power_eigenvalues(MatrixOperator(a), k=2, tol=1e-8, max_iter=500)
    assert torch.allclose(r.eigenvalues, exact.flip(0)[:2], rtol=1e-6)


def test_hutchinson_trace_within_three_standard_errors():
    a = with_spectrum(SPECTRA["separated"])
    r = hutchinson_trace(MatrixOperator(a), rtol=0.02, max_samples=2000, block=4)
    assert abs(r.trace - float(torch.trace(a))) <= 3 * r.stderr
    assert r.n_hvp == r.n_samples and r.n_samples % 4 == 0


def test_density_weights_sum_to_one_and_match_the_first_two_moments():
    a = with_spectrum(SPECTRA["separated"])
    d = lanczos_density(MatrixOperator(a), n_steps=DIM, n_vectors=40, seed=3)
    assert torch.allclose(d.weights.sum(1), torch.ones(40, dtype=torch.float64), atol=1e-10)
    m1 = float((d.weights * d.nodes).sum(1).mean())
    m2 = float((d.weights * d.nodes**2).sum(1).mean())
    exact = torch.linalg.eigvalsh(a)
    # each quadrature is exact for polynomials; the estimator averages z^T A^p z / ||z||^2
    assert abs(m1 - float(exact.mean())) <= 0.1 * float(exact.abs().mean())
    assert abs(m2 - float((exact**2).mean())) <= 0.1 * float((exact**2).mean())


def test_matrix_operator_refuses_a_non_square_matrix():
    with pytest.raises(ValueError, match="square"):
        MatrixOperator(torch.zeros(3, 4))


# ---- the stop on the estimated eigenvalue error ----------------------------------------------------
# Spectra with near-degenerate and crossing eigenvalues: "near_pair": λ_1, λ_2 1e-3 of λ_1 apart (ten
# times the tolerance: both must be found); "edge_pair": λ_min and the next 2e-3 of λ_1 apart at the
# edge of the bulk; "crossing_*": λ_2 and λ_3 before, at (1e-5 apart, below the tolerance: both must
# still be reported) and after a crossing; "tied": λ_1, λ_2 6e-9 apart (one Krylov space holds one
# copy: only k=1 is asked).
STOP_SPECTRA = {
    **{name: SPECTRA[name] for name in ("separated", "negative_dominant")},
    "near_pair": [6.0, 6.0 - 6e-3, 2.0, -0.5],
    "edge_pair": [8.0, 5.0, 4.0, -0.07, -0.055],
    "crossing_before": [10.0, 7.2, 6.8, 3.0, -1.0],
    "crossing_at": [10.0, 7.0001, 7.0, 3.0, -1.0],
    "crossing_after": [10.0, 6.8, 7.2, 3.0, -1.0],
    "tied": [6.0, 6.0 - 6e-9, 2.0, -0.5],
}


def true_errors(r, exact: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [
            (r.eigenvalues - exact.flip(0)[: len(r.eigenvalues)]).abs(),
            (r.smallest - exact[: len(r.smallest)]).abs(),
        ]
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(STOP_SPECTRA))
def test_eigenvalue_stop_reaches_the_promised_error_and_never_underestimates_it(name, seed):
    """Default stop (tol 1e-4 of |λ_1|): every reported eigenvalue within the tolerance, and the
    estimate of each at least its true error, except within a tie narrower than the tolerance,
    which a Krylov space cannot see (the Ritz value is a mix of the two: off by at most the tie)."""
    a = with_spectrum(STOP_SPECTRA[name], seed=seed)
    exact = torch.linalg.eigvalsh(a)
    k = 1 if name == "tied" else 3
    r = lanczos_eigenvalues(MatrixOperator(a), k=k, smallest=1, max_iter=DIM, seed=seed)
    scale = float(exact.abs().max())
    true = true_errors(r, exact)
    assert r.converged and float(true.max()) <= DEFAULT_TOL * scale, (name, true / scale)
    tie = 6e-9 if name == "tied" else 0.0
    assert torch.all(true <= torch.cat([r.errors, r.smallest_errors]) + tie), name
    assert float(true.max()) / scale <= r.rel_error + tie / scale and r.rel_error <= DEFAULT_TOL


def test_the_estimate_bounds_the_error_at_every_step_of_a_separated_spectrum():
    """Not only at the stop: after each Lanczos step (the run's prefix), estimate >= true error, once
    two Ritz values lie beside the 4 wanted ones. Before that a Ritz value can sit nearer another
    eigenvalue than the one of its rank (step 5 here: the estimate bounds the distance to *an*
    eigenvalue), which is why the stop is never taken there."""
    a = with_spectrum(SPECTRA["separated"], seed=4)
    exact = torch.linalg.eigvalsh(a)
    early = lanczos_eigenvalues(MatrixOperator(a), k=3, smallest=1, max_iter=5, tol=1e-15)
    assert not early.converged
    assert not torch.all(true_errors(early, exact) <= torch.cat([early.errors, early.smallest_errors]))
    for steps in range(6, 30):
        r = lanczos_eigenvalues(MatrixOperator(a), k=3, smallest=1, max_iter=steps, tol=1e-15)
        assert r.n_iter == steps
        assert torch.all(true_errors(r, exact) <= torch.cat([r.errors, r.smallest_errors]) + 1e-14), steps


def test_ritz_error_bounds_quadratic_when_isolated_residual_when_not():
    theta = torch.tensor([-1.0, 2.0, 5.0, 9.0], dtype=torch.float64)
    res = torch.tensor([1e-3, 1e-3, 1e-3, 1e-3], dtype=torch.float64)
    est = ritz_error_bounds(theta, res)
    # isolated, converged: about safety · r² / gap, far below the residual
    assert est[3] == pytest.approx(GAP_SAFETY * 1e-6 / (4.0 - 1e-3), rel=1e-3)
    assert torch.all(est <= res)
    # a neighbour that has not converged (residual as large as the gap): back to the residual
    res[2] = 4.0
    assert ritz_error_bounds(theta, res)[3] == pytest.approx(1e-3)
    # a lone Ritz value says nothing about the gap
    assert ritz_error_bounds(theta[:1], res[:1])[0] == res[0]


def test_residual_stop_keeps_the_former_rule():
    a = with_spectrum(SPECTRA["separated"])
    r = lanczos_eigenvalues(MatrixOperator(a), k=2, stop="residual", tol=1e-6, max_iter=DIM)
    assert r.converged and float(r.residuals.max()) <= 1e-6 * float(r.eigenvalues.abs().max())
    with pytest.raises(ValueError, match="stop"):
        lanczos_eigenvalues(MatrixOperator(a), stop="digits")


def test_progress_reports_every_step_with_the_current_error():
    a = with_spectrum(SPECTRA["separated"])
    seen = []
    r = lanczos_eigenvalues(MatrixOperator(a), k=2, smallest=1, max_iter=DIM, progress=seen.append)
    assert [p.step for p in seen] == list(range(1, r.n_iter + 1))
    assert seen[0].rel_error == float("inf") and seen[-1].rel_error == pytest.approx(r.rel_error)
    assert seen[-1].rel_error <= DEFAULT_TOL < seen[len(seen) // 2].rel_error
    lines = []
    printer = ProgressLines("[test]", lines.append, after_s=0.0, every_s=0.0)
    for p in seen[:3]:
        printer(p)
    assert len(lines) == 3 and "Lanczos step 3" in lines[-1] and "of |λ_1|" in lines[-1]
    quiet = []
    later = ProgressLines("[test]", quiet.append, after_s=3600.0)
    later(seen[-1])
    assert quiet == []


# ---- warm starts over a sequence of matrices ---------------------------------------------------------
def drifting(dim: int, n: int, lam, rotation: float, seed: int = 0):
    """``n`` matrices ``Q_t diag(lam(t), bulk) Q_tᵀ``: eigenvalues ``lam(t)`` (t in [0, 1]) over a fixed
    bulk in [-1, 2], eigenvectors turning by ``rotation`` (a random skew generator) per matrix."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    s = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    turn = torch.linalg.matrix_exp((s - s.T) * rotation / dim**0.5)
    bulk = torch.rand(dim - len(lam(0.0)), generator=g, dtype=torch.float64) * 3 - 1
    for i in range(n):
        a = q @ torch.diag(torch.cat([torch.tensor(lam(i / (n - 1)), dtype=torch.float64), bulk])) @ q.T
        yield (a + a.T) / 2
        q = turn @ q


def warm_and_cold(mats, k: int, smallest: int):
    """Per matrix: (exact spectrum, cold result, result warm-started from the previous warm one)."""
    start, out = None, []
    for a in mats:
        cold = lanczos_eigenvalues(MatrixOperator(a), k, smallest=smallest, max_iter=150)
        warm = lanczos_eigenvalues(
            MatrixOperator(a), k, smallest=smallest, max_iter=150, start=start, return_start=True
        )
        start = warm.start_vectors
        out.append((torch.linalg.eigvalsh(a), cold, warm))
    return out


@pytest.mark.parametrize(
    "lam",
    [
        lambda t: [10.0, 7.0 - 2.0 * t, 5.6 + 2.0 * t, 4.0, 3.0, 1.5],  # λ_2 and λ_3 cross at t = 0.35
        lambda t: [
            10.0,
            7.0,
            5.0,
            4.0,
            3.0,
            1.5 + 7.0 * (t > 0.7),
        ],  # an eigenvalue from the bulk jumps to λ_2
    ],
    ids=["lambda2_lambda3_cross", "bulk_eigenvalue_jumps_into_the_top"],
)
def test_warm_start_keeps_the_right_top_k_when_eigenvalues_cross(lam):
    mats = list(drifting(120, 8, lam, rotation=0.05))
    ranks = [torch.linalg.eigvalsh(a).flip(0)[:3] for a in mats]
    assert not torch.allclose(ranks[0], ranks[-1], atol=0.5)  # the top-3 did change
    for i, (exact, _, warm) in enumerate(warm_and_cold(mats, k=3, smallest=1)):
        assert warm.warm == (i > 0)
        true = true_errors(warm, exact)
        assert float(true.max()) <= DEFAULT_TOL * float(exact.abs().max()), (i, true)
        assert torch.all(true <= torch.cat([warm.errors, warm.smallest_errors])), i


def test_warm_start_uses_fewer_products_than_cold_over_a_sequence():
    """Slowly turning eigenvectors, λ_min at the edge of a dense bulk (what takes Lanczos long)."""
    runs = warm_and_cold(
        drifting(400, 6, lambda t: [10.0, 7.0 - 2.0 * t, 5.6 + 2.0 * t, 4.0, 2.8], 0.3), 3, 1
    )
    cold, warm = sum(c.n_hvp for _, c, _ in runs), sum(w.n_hvp for _, _, w in runs)
    assert warm < 0.95 * cold, (warm, cold)
    for exact, _, w in runs:
        assert float(true_errors(w, exact).max()) <= DEFAULT_TOL * float(exact.abs().max())


def test_a_start_block_and_its_combined_vector_start_the_same_run():
    """What the callback keeps (one vector) starts exactly the run the block starts."""
    mats = list(drifting(80, 2, lambda t: [10.0, 7.0, 5.0, 4.0], 0.1))
    first = lanczos_eigenvalues(MatrixOperator(mats[0]), 3, smallest=1, max_iter=80, return_start=True)
    assert first.start_vectors.shape == (80, 3 + 2 + 1 + 2)
    block = lanczos_eigenvalues(
        MatrixOperator(mats[1]), 3, smallest=1, max_iter=80, start=first.start_vectors
    )
    one = lanczos_eigenvalues(
        MatrixOperator(mats[1]), 3, smallest=1, max_iter=80, start=warm_start_vector(first.start_vectors)
    )
    assert block.warm and one.warm and block.n_hvp == one.n_hvp
    assert torch.equal(block.eigenvalues, one.eigenvalues)
    # an unusable start (wrong size, not finite) falls back to the cold start
    cold = lanczos_eigenvalues(MatrixOperator(mats[1]), 3, smallest=1, max_iter=80)
    for bad in (torch.ones(79), torch.full((80,), float("nan"))):
        r = lanczos_eigenvalues(MatrixOperator(mats[1]), 3, smallest=1, max_iter=80, start=bad)
        assert not r.warm and torch.equal(r.eigenvalues, cold.eigenvalues)
