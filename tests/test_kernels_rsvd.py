"""The batched randomized SVD op: default kernel against exact SVD, batching, edge cases,
the CholeskyQR2 fallback, input checks, opcheck, and the projector's batch entry point."""
from __future__ import annotations

import pytest
import torch

import lowrank_optim  # noqa: F401  (registers the ops)
from lowrank_optim.kernels import rsvd as kernel
from lowrank_optim.projectors import RandomizedSVDProjector
from lowrank_optim.projectors.rsvd import fixed_signs

op = torch.ops.lowrank_optim.batched_randomized_svd


def with_spectrum(m, n, spectrum, seed=0):
    """U diag(spectrum) V^T with random orthonormal U, V: a matrix whose SVD we know."""
    gen = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    return (u * spectrum) @ v.t()


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def energy_fraction(matrix, left):
    """||U^T A||_F^2 / ||A||_F^2: the share of the matrix the basis keeps."""
    return float((left.t() @ matrix).square().sum() / matrix.square().sum())


def assert_orthonormal_columns(x, atol=1e-5):
    torch.testing.assert_close(x.mT @ x, torch.eye(x.shape[-1]).expand(x.shape[0], -1, -1), atol=atol, rtol=0)


# ---------------------------------------------------------------------------- accuracy
def test_decaying_spectrum_captures_the_optimal_energy_and_subspace():
    m, n, rank = 60, 90, 8
    a = with_spectrum(m, n, 0.7 ** torch.arange(40.0))
    u, vh = op(a[None], gaussian(1, n, rank + 8), rank, 2)
    exact_u, _, exact_vh = torch.linalg.svd(a, full_matrices=False)
    optimal = energy_fraction(a, exact_u[:, :rank])
    assert abs(energy_fraction(a, u[0]) - optimal) < 1e-4
    assert abs(energy_fraction(a.t(), vh[0].t()) - optimal) < 1e-4
    # Principal angles: the cosines are the singular values of U_exact^T U.
    assert torch.linalg.svdvals(exact_u[:, :rank].t() @ u[0]).min() > 1 - 1e-4
    assert torch.linalg.svdvals(exact_vh[:rank] @ vh[0].t()).min() > 1 - 1e-4


def test_power_iterations_improve_a_flat_spectrum():
    a = with_spectrum(80, 120, torch.linspace(1.0, 0.5, 60)) + 0.05 * gaussian(80, 120, seed=1)
    omega = gaussian(1, 120, 12, seed=2)
    crude = energy_fraction(a, op(a[None], omega, 6, 0)[0][0])
    refined = energy_fraction(a, op(a[None], omega, 6, 3)[0][0])
    exact = energy_fraction(a, torch.linalg.svd(a).U[:, :6])
    assert crude < refined - 1e-3 and refined <= exact + 1e-6


def test_batched_equals_one_call_per_matrix():
    a = torch.stack([with_spectrum(40, 70, 0.8 ** torch.arange(30.0), seed=s) for s in range(3)])
    omega = gaussian(3, 70, 12)
    u, vh = op(a, omega, 5, 2)
    for i in range(3):
        u_i, vh_i = op(a[i : i + 1], omega[i : i + 1], 5, 2)
        torch.testing.assert_close(u[i], u_i[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(vh[i], vh_i[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "batch,m,n,rank,k",
    [
        (1, 17, 33, 5, 13),  # odd sizes, m < n
        (2, 33, 17, 5, 13),  # m > n
        (2, 12, 20, 12, 12),  # rank = k = min(m, n): the full SVD
        (3, 20, 12, 12, 12),
        (1, 9, 9, 1, 9),  # k clipped to min(m, n), rank 1
    ],
)
def test_shapes_orthonormality_and_full_rank_reconstruction(batch, m, n, rank, k):
    a = gaussian(batch, m, n, seed=m * n)
    u, vh = op(a, gaussian(batch, n, k, seed=1), rank, 1)
    assert u.shape == (batch, m, rank) and vh.shape == (batch, rank, n)
    assert_orthonormal_columns(u)
    assert_orthonormal_columns(vh.mT)
    if rank == min(m, n):  # the whole matrix: U (U^T A V) V^T = A
        torch.testing.assert_close(u @ (u.mT @ a @ vh.mT) @ vh, a, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- fallback
def test_rank_deficient_sketch_is_rejected_by_cholesky_qr2_and_householder_takes_over():
    a = with_spectrum(50, 40, torch.tensor([3.0, 2.0, 1.0]))  # rank 3 < k = 10
    y = a[None] @ gaussian(1, 40, 10)
    assert not bool(kernel.cholesky_qr2(y)[2].all())
    q, r = kernel.qr(y)
    assert_orthonormal_columns(q)
    torch.testing.assert_close(q @ r, y, atol=1e-4, rtol=0)
    u, vh = op(a[None], gaussian(1, 40, 10), 3, 2)
    assert_orthonormal_columns(u)
    torch.testing.assert_close(u[0] @ (u[0].t() @ a), a, atol=1e-4, rtol=0)  # rank 3 captured whole


def test_fallback_is_per_matrix_in_a_mixed_batch():
    good = with_spectrum(30, 24, 0.9 ** torch.arange(24.0), seed=1)
    a = torch.stack([good, with_spectrum(30, 24, torch.tensor([1.0, 1.0]), seed=2), torch.zeros(30, 24)])
    omega = gaussian(3, 24, 8)
    u, vh = op(a, omega, 4, 1)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert_orthonormal_columns(u)
    assert_orthonormal_columns(vh.mT)
    alone = op(a[:1], omega[:1], 4, 1)[0][0]
    torch.testing.assert_close(u[0], alone, atol=1e-5, rtol=0)


def test_well_conditioned_sketch_is_accepted_by_cholesky_qr2():
    y = gaussian(2, 64, 16)
    q, r, accepted = kernel.cholesky_qr2(y)
    assert bool(accepted.all())
    assert_orthonormal_columns(q, atol=1e-6)
    torch.testing.assert_close(q @ r, y, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- input checks
@pytest.mark.parametrize(
    "matrices,omega,rank,power_iters,message",
    [
        (gaussian(8, 6), gaussian(1, 6, 3), 2, 1, r"matrices must be 3-D \(batch, m, n\), got shape \(8, 6\)"),
        (gaussian(1, 8, 6), gaussian(6, 3), 2, 1, r"omega must be 3-D"),
        (gaussian(1, 8, 6).double(), gaussian(1, 6, 3), 2, 1, r"matrices must be float32.*float64"),
        (gaussian(1, 8, 6), gaussian(1, 6, 3).half(), 2, 1, r"omega must be float32.*float16"),
        (gaussian(2, 8, 6), gaussian(2, 7, 3), 2, 1, r"omega must have shape \(2, 6, k\).*got \(2, 7, 3\)"),
        (gaussian(2, 8, 6), gaussian(1, 6, 3), 2, 1, r"omega must have shape \(2, 6, k\)"),
        (gaussian(1, 8, 6), gaussian(1, 6, 7), 2, 1, r"omega's width k=7 must be in \[1, min\(m, n\)=6\]"),
        (gaussian(1, 8, 6), gaussian(1, 6, 3), 4, 1, r"rank=4 must be in \[1, k=3\]"),
        (gaussian(1, 8, 6), gaussian(1, 6, 3), 0, 1, r"rank=0"),
        (gaussian(1, 8, 6), gaussian(1, 6, 3), 2, -1, r"power_iters=-1 must be >= 0"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(matrices, omega, rank, power_iters, message):
    with pytest.raises(ValueError, match=r"lowrank_optim::batched_randomized_svd: " + message):
        op(matrices, omega, rank, power_iters)


@pytest.mark.parametrize("batch,m,n,rank,k,power_iters", [(2, 9, 13, 3, 6, 1), (1, 12, 7, 7, 7, 0)])
def test_opcheck(batch, m, n, rank, k, power_iters):
    torch.library.opcheck(op, (gaussian(batch, m, n), gaussian(batch, n, k, seed=1), rank, power_iters))


# ---------------------------------------------------------------------------- projector
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_projector_batch_equals_one_compute_bases_per_parameter(proj_type):
    projector = RandomizedSVDProjector(4, proj_type, 10, oversample=3, power_iters=1)
    shapes = [(20, 12), (12, 20), (20, 12), (20, 12), (16, 16)]
    matrices = [with_spectrum(*s, 0.8 ** torch.arange(12.0), seed=i) for i, s in enumerate(shapes)]
    states = [projector.init_state(torch.Size(s), seed=7 + i) for i, s in enumerate(shapes)]
    states[2]["refreshes"] = 3  # a later refresh draws another Omega from the same seed
    batched = projector.compute_bases_many(matrices, states)
    for matrix, state, bases in zip(matrices, states, batched):
        single = projector.compute_bases(matrix, state)
        assert bases.keys() == single.keys()
        for key in single:
            torch.testing.assert_close(bases[key], single[key], atol=1e-5, rtol=0)


def test_projector_draws_omega_from_the_parameters_generator():
    """The op sees exactly the sketch today's single-matrix path draws: same seed, same basis."""
    projector = RandomizedSVDProjector(3, "left", 10)
    matrix = gaussian(15, 25)
    state = projector.init_state(torch.Size((15, 25)), seed=5)
    gen = projector.generator(5, 0, matrix.device)
    omega = torch.randn(25, 11, generator=gen)
    u, _ = fixed_signs(*op(matrix[None], omega[None], 3, projector.power_iters))  # the projector's sign convention
    torch.testing.assert_close(projector.compute_bases(matrix, state)["left"], u[0], atol=0, rtol=0)


def test_projector_batch_rejects_mismatched_lists():
    projector = RandomizedSVDProjector(2)
    with pytest.raises(ValueError, match="RandomizedSVDProjector: 2 matrices but 1 states"):
        projector.compute_bases_many([gaussian(4, 4), gaussian(4, 4)], [projector.init_state(torch.Size((4, 4)), 0)])


# ---------------------------------------------------------------- the optimizer batches refreshes
def _rsvd_run(batch, steps=5, poison=None):
    """GaLoreAdamW (rsvd, gap 2) on five same-shaped matrices and one of another shape."""
    import lowrank_optim as lo

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24, 10, generator=gen)) for _ in range(5)]
    params.append(torch.nn.Parameter(torch.randn(9, 30, generator=gen)))
    opt = lo.GaLoreAdamW(
        [{"params": params, "rank": 3, "projector": "rsvd", "update_proj_gap": 2,
          "projector_args": {"batch": batch}}], lr=1e-2,
    )
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen)
            if poison is not None and (t, i) == poison:
                p.grad[0, 0] = float("nan")
        opt.step()
    return params, opt


def test_optimizer_refreshes_same_shaped_matrices_in_one_call_per_chunk(monkeypatch):
    calls = []
    original = RandomizedSVDProjector._refresh_chunk

    def counting(self, matrices, pstates, rank, device):
        calls.append(len(matrices))
        return original(self, matrices, pstates, rank, device)

    monkeypatch.setattr(RandomizedSVDProjector, "_refresh_chunk", counting)
    _rsvd_run(batch=2, steps=1)
    # five 24x10 matrices in chunks of 2, 2, 1 and the lone 9x30 matrix.
    assert sorted(calls) == [1, 1, 2, 2]


def test_batched_refresh_gives_the_one_by_one_trajectory():
    batched, _ = _rsvd_run(batch=8)
    one_by_one, _ = _rsvd_run(batch=1)
    for a, b in zip(batched, one_by_one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_non_finite_gradient_in_a_batch_skips_only_that_matrix():
    with pytest.warns(RuntimeWarning, match="non-finite"):
        params, opt = _rsvd_run(batch=8, steps=3, poison=(2, 1))
    refreshes = [opt.state[p]["projector"]["refreshes"] for p in params]
    # Steps 0 and 2 refresh; matrix 1's second refresh was skipped (old basis kept).
    assert refreshes == [2, 1, 2, 2, 2, 2]
    assert all(torch.isfinite(p).all() for i, p in enumerate(params) if i != 1)
