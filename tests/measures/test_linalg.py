"""The solvers of ``measures.linalg`` on plain symmetric matrices with known spectra.

Each matrix is ``Q diag(λ) Qᵀ`` with a random orthogonal ``Q`` and a chosen ``λ``; the reference is
``torch.linalg.eigvalsh`` of the same matrix (not the chosen ``λ``, so rounding is compared like
with like). The spectra cover what a Hessian shows: a few outliers over a bulk, clusters,
repeated eigenvalues and negative ones.
"""

from __future__ import annotations

import pytest
import torch

from measures.linalg import (
    MatrixOperator,
    hutchinson_trace,
    lanczos_density,
    lanczos_eigenvalues,
    power_eigenvalues,
)

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
