"""FiraAdamW: the reference package ``fira`` (bit for bit), the paper's formula from
docs/methods/fira.md#update-rule (a small readable reference below), the norm-growth limiter, the
matrix scaling, bad inputs and the absence of host syncs in a step."""
from __future__ import annotations

import re

import pytest
import torch

from lowrank_optim.optim.fira import FiraAdamW
from conftest import REFERENCE_SHAPES, twin_params

SHAPES = REFERENCE_SHAPES


def grads_for(step, shapes):
    """Low-rank-dominated gradients whose size swings from step to step (x0.5 .. x2), so the
    limiter both engages and stays idle within a run."""
    gen = torch.Generator().manual_seed(1000 + step)
    size = 2.0 ** ((step % 5) / 2 - 1)
    out = []
    for s in shapes:
        g = torch.randn(*s, generator=gen)
        if len(s) == 2:
            g += 4 * torch.randn(s[0], 2, generator=gen) @ torch.randn(2, s[1], generator=gen)
        out.append(size * g)
    return out


# ---------------------------------------------------------------------------- reference package
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_reference_compat_is_bit_identical_to_fira(proj_type):
    """reference_compat + HF arithmetic reproduce fira.FiraAdamW exactly: weights, moments and
    the limiter's stored norm, over 4 refreshes, non-default rank/gap/scale/betas/decay/eps."""
    fira = pytest.importorskip("fira")
    a, b = twin_params(seed=3)
    # fira's reverse_std re-derives the side from R's shape, which is ambiguous when square.
    n = 2 if proj_type == "reverse_std" else 3
    low = dict(rank=5, update_proj_gap=4, proj_type=proj_type)
    common = dict(lr=3e-3, betas=(0.85, 0.97), eps=1e-6, weight_decay=0.1)
    ours = FiraAdamW(
        [{"params": a[:n], "scale": 0.37, **low}, {"params": [a[3]]}],
        eps_style="hf", decay_after_update=True, reference_compat=True, projector="svd", **common,
    )
    ref = fira.FiraAdamW(
        [{"params": b[:n], "alpha": 0.37, **low}, {"params": [b[3]]}], no_deprecation_warning=True, **common
    )
    pa, pb = a[:n] + [a[3]], b[:n] + [b[3]]
    clamped = idle = 0
    for t in range(15):
        for p, q, g in zip(pa, pb, grads_for(t, [tuple(p.shape) for p in pa])):
            p.grad, q.grad = g.clone(), g.clone()  # fira's step takes p.grad as it is
        before = ours.state[a[0]]["residual_norm"].clone() if t else None
        ours.step()
        ref.step()
        if before is not None:
            after = ours.state[a[0]]["residual_norm"]
            hit = torch.isclose(after, (before + 1e-8) * 1.01, rtol=1e-5)
            clamped, idle = clamped + int(hit), idle + int(not hit)
    assert clamped and idle  # both limiter branches were compared
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    for p, q in zip(a[:n], b[:n]):
        assert torch.equal(ours.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        assert torch.equal(ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
        assert torch.equal(ours.state[p]["residual_norm"], ref.state[q]["scaling_grad"])


# ---------------------------------------------------------------------------- the paper's formula
def fira_paper_reference(weights, grad_steps, *, rank, gap, scale, lr, betas, eps, weight_decay, gamma, scaling):
    """Fira as docs/methods/fira.md#update-rule states it, one matrix at a time: GaLore's low-rank
    Adam with torch.optim.AdamW's eps placement (N = M / (sqrt(V / (1 - b2^t)) + eps), step
    lr / (1 - b1^t)), phi over the rank dimension, S = (G - back(R)) * phi, the limiter on
    ||S||, D = scale * (back(N) + S), decay before the update."""
    beta1, beta2 = betas
    out = []
    for i, w in enumerate(weights):
        w = w.detach().clone()
        m_rows, n_cols = w.shape
        right = m_rows >= n_cols  # GaLore's std rule
        exp_avg = exp_avg_sq = previous_norm = None
        for t, grads in enumerate(grad_steps):
            g = grads[i]
            if t % gap == 0:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                basis = vh[:rank] if right else u[:, :rank]

            def project(x):
                return x @ basis.T if right else basis.T @ x

            def back(x):
                return x @ basis if right else basis @ x

            r = project(g)
            if exp_avg is None:
                exp_avg, exp_avg_sq = torch.zeros_like(r), torch.zeros_like(r)
            exp_avg = beta1 * exp_avg + (1 - beta1) * r
            exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * r * r
            k = t + 1
            n = exp_avg / ((exp_avg_sq / (1 - beta2**k)).sqrt() + eps)
            step_size = lr / (1 - beta1**k)
            if scaling == "column":
                rank_dim = 1 if right else 0
                phi = n.norm(dim=rank_dim, keepdim=True) / (r.norm(dim=rank_dim, keepdim=True) + 1e-8)
            else:
                phi = n.norm() / (r.norm() + 1e-8)
            s = (g - back(r)) * phi
            if previous_norm is not None and s.norm() > gamma * previous_norm:
                s = s * (gamma * previous_norm / s.norm())
            previous_norm = s.norm()
            w = w * (1 - lr * weight_decay) - step_size * scale * (back(n) + s)
        out.append(w)
    return out


PAPER_HYPER = dict(rank=4, gap=4, scale=0.37, lr=5e-3, betas=(0.85, 0.97), eps=1e-3, weight_decay=0.1, gamma=1.05)


def run_paper(scaling, steps=13, **overrides):
    hyper = {**PAPER_HYPER, **overrides}
    mats, _ = twin_params(seed=11)
    start = [m.detach().clone() for m in mats[:2]]
    opt = FiraAdamW(
        [{"params": mats[:2], "rank": hyper["rank"], "update_proj_gap": hyper["gap"], "scale": hyper["scale"]}],
        lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"], weight_decay=hyper["weight_decay"],
        norm_growth_limit=hyper["gamma"], scaling=scaling, projector="svd",  # the reference's exact SVD
    )
    grad_steps = [grads_for(t, SHAPES[:2]) for t in range(steps)]
    for grads in grad_steps:
        for p, g in zip(mats[:2], grads):
            p.grad = g.clone()
        opt.step()
    return mats[:2], fira_paper_reference(start, grad_steps, scaling=scaling, **hyper)


@pytest.mark.parametrize("scaling", ["column", "matrix"])
def test_paper_mode_matches_readable_reference(scaling):
    """Default mode (paper residual, torch eps placement, decay first) against the formula;
    eps=1e-3 makes the eps placement matter, 3 refreshes, a right- and a left-projected matrix."""
    ours, expected = run_paper(scaling)
    for p, q in zip(ours, expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


def test_matrix_scaling_differs_from_column():
    column, _ = run_paper("column", steps=4)
    matrix, _ = run_paper("matrix", steps=4)
    for p, q in zip(column, matrix):
        assert not torch.allclose(p, q, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- norm-growth limiter
class RecordingFira(FiraAdamW):
    """Records the residual the update adds: c φ (G - P R) in the paper's factored form,
    (direction after - before) in the reference's."""

    def factored_update(self, step):
        low_direction, coefficient = super().factored_update(step)
        inside = step.projector.project_back(step.low, step.state["projector"])
        self.residuals = getattr(self, "residuals", []) + [coefficient * (step.grad - inside)]
        return low_direction, coefficient

    def full_rank_direction(self, direction, step):
        before = direction.clone()
        after = super().full_rank_direction(direction, step)
        self.residuals = getattr(self, "residuals", []) + [after - before]
        return after


def limiter_run(gradients, **kw):
    """Steps one 24 x 10 matrix (right-projected, no refresh after the first step) through
    ``gradients``: numbers are sizes of a fresh random gradient, ``"inside"`` is a gradient
    lying in the current subspace up to 1e-3 (its residual nearly vanishes)."""
    w = torch.nn.Parameter(torch.randn(24, 10, generator=torch.Generator().manual_seed(2)))
    opt = RecordingFira([{"params": [w], "rank": 3, "update_proj_gap": 100}], lr=1e-3, **kw)
    norms = []
    gen = torch.Generator().manual_seed(4)
    for size in gradients:
        g = torch.randn(24, 10, generator=gen)
        if size == "inside":
            basis = opt.state[w]["projector"]["right"]
            g = g @ basis.T @ basis + 1e-3 * g
        w.grad = g if size == "inside" else size * g
        opt.step()
        norms.append(opt.state[w]["residual_norm"].clone() if "residual_norm" in opt.state[w] else None)
    return opt, norms


def test_limiter_clamps_a_spike_to_exactly_gamma_times_the_previous_norm():
    gamma = 1.01
    opt, norms = limiter_run([1, 1, 1, 100, "inside"], norm_growth_limit=gamma)
    applied = [r.norm() for r in opt.residuals]
    assert norms[0].dim() == 0 and norms[0].dtype == torch.float32
    torch.testing.assert_close(norms[0], applied[0])  # the first step only stores
    assert torch.equal(norms[3], norms[2] * gamma)  # the 100x spike: stored norm exactly gamma x previous
    torch.testing.assert_close(applied[3], norms[2] * gamma, rtol=1e-5, atol=0)  # and the residual obeys it
    # A gradient (almost) inside the subspace: the residual collapses and is not lifted back.
    # Its norm comes from ‖G‖² - ‖R‖² per channel (no residual is formed), which loses the
    # relative precision eps ‖G‖²/‖S‖² ≈ 1e-7 / 1e-6 here: a few percent of a residual that
    # is itself 1e-3 of the gradient.
    assert norms[4] < norms[3] / 10
    torch.testing.assert_close(applied[4], norms[4], rtol=5e-2, atol=0)


def test_limiter_reference_arithmetic_and_disabled():
    opt, norms = limiter_run([1, 1, 100], norm_growth_limit=1.01, reference_compat=True)
    torch.testing.assert_close(norms[2], (norms[1] + 1e-8) * 1.01, rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.residuals[2].norm(), norms[2], rtol=1e-5, atol=0)
    free, norms = limiter_run([1, 1, 100], norm_growth_limit=None)
    assert norms == [None, None, None]  # no limiter, no state
    # Unlimited, the spike's residual grows far beyond 1%: Adam's N grows less than R, so
    # phi = |N| / |R| absorbs most of the 100x, but not all of it.
    assert free.residuals[2].norm() > 1.5 * free.residuals[1].norm()


# ---------------------------------------------------------------------------- validation
def mats():
    return [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(5, 12))]


BAD_INPUTS = [
    (dict(norm_growth_limit=-1), "FiraAdamW: invalid norm_growth_limit=-1 in the constructor"),
    (dict(norm_growth_limit=0), "FiraAdamW: invalid norm_growth_limit=0 in the constructor"),
    (dict(norm_growth_limit=0.5), "FiraAdamW: invalid norm_growth_limit=0.5"),
    (dict(norm_growth_limit=float("inf")), "FiraAdamW: invalid norm_growth_limit=inf"),
    (dict(norm_growth_limit="1.01"), "FiraAdamW: invalid norm_growth_limit='1.01'"),
    (dict(scaling="row"), "FiraAdamW: invalid scaling='row' in the constructor: must be one of 'column', 'matrix'"),
    (dict(reference_compat=1), "FiraAdamW: invalid reference_compat=1"),
    (dict(eps_style="tf"), "FiraAdamW: invalid eps_style='tf'"),
]


@pytest.mark.parametrize("kw, message", BAD_INPUTS, ids=[m.split(": invalid ")[1].split(" ")[0] for _, m in BAD_INPUTS])
def test_bad_constructor_values_raise(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FiraAdamW([{"params": mats(), "rank": 2}], **kw)


def test_bad_group_values_raise():
    with pytest.raises(ValueError, match=re.escape("FiraAdamW: invalid scaling='row' in param group 1")):
        FiraAdamW([{"params": mats()[:1], "rank": 2}, {"params": mats()[1:], "rank": 2, "scaling": "row"}])
    full = r"FiraAdamW: scaling='column' cannot be combined with proj_type='full' in param group 0"
    with pytest.raises(ValueError, match=full):
        FiraAdamW([{"params": mats(), "rank": 2, "proj_type": "full"}])
    FiraAdamW([{"params": mats(), "rank": 2, "proj_type": "full", "scaling": "matrix"}], norm_growth_limit=None)


# ---------------------------------------------------------------------------- no host sync


def test_bf16_products_take_the_residual_norm_from_the_formed_residual():
    """‖S‖ from ‖G‖² - ‖R‖² cancels catastrophically when R is rounded to bf16 and holds most
    of G's energy (here 99.99%): with bf16 products Fira forms the residual instead, so the
    limiter's norm is the one of the residual it adds (it was 7.6x too large before)."""
    gen = torch.Generator().manual_seed(0)
    m, n, r = 48, 32, 8
    u = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    grad = u @ torch.diag(torch.linspace(2, 1, r)) @ v.T + 1e-2 * torch.randn(m, n, generator=gen) / (m * n) ** 0.5

    class Formed(FiraAdamW):
        def materializes_direction(self, group, projector):
            return True

    norms = {}
    for cls in (FiraAdamW, Formed):
        w = torch.nn.Parameter(torch.zeros(m, n))
        opt = cls([{"params": [w], "rank": r, "projector": "svd", "projector_args": {"product_dtype": "bfloat16"}}], lr=1e-2)
        w.grad = grad.clone()
        opt.step()
        norms[cls] = opt.state[w]["residual_norm"].item()
    assert norms[FiraAdamW] == pytest.approx(norms[Formed], rel=1e-6)
    fp32 = FiraAdamW([{"params": [torch.nn.Parameter(torch.zeros(m, n))], "rank": r, "projector": "svd"}])
    assert not fp32.materializes_direction(fp32.param_groups[0], fp32._projector(0))  # exact products: factored
