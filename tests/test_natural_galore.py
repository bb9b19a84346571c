"""NaturalGaLoreAdamW: the Woodbury product against a direct solve, the optimizer against a
small readable reference written from docs/methods/natural_galore.md#update-rule, the history's FIFO order and its
treatment at a refresh, training, bad inputs, resume and the absence of host syncs."""
from __future__ import annotations

import io
import re

import pytest
import torch

from lowrank_optim.optim.natural_galore import NaturalGaLoreAdamW, inverse_fisher_product
from conftest import REFERENCE_SHAPES, mse_losses, twin_params

SHAPES = REFERENCE_SHAPES[:2]  # (37, 20): right-projected, (12, 29): left-projected


def grads_for(step, shapes, seed=0):
    """Low-rank-dominated gradients, different at every step."""
    gen = torch.Generator().manual_seed(seed + 1000 + step)
    out = []
    for s in shapes:
        g = torch.randn(*s, generator=gen)
        if len(s) == 2:
            g += 3 * torch.randn(s[0], 2, generator=gen) @ torch.randn(2, s[1], generator=gen)
        out.append(g)
    return out


def direct_solve(history, current, damping):
    """(λI + H H^T)^{-1} g by a dense k x k solve in float64 (H = history^T, g = its column)."""
    h = history.reshape(history.shape[0], -1).double().t()  # k x s
    k = h.shape[0]
    fisher = damping * torch.eye(k, dtype=torch.float64) + h @ h.t()
    return torch.linalg.solve(fisher, h[:, current])


# ---------------------------------------------------------------------------- Woodbury
@pytest.mark.parametrize("damping", [1e-3, 0.3])
@pytest.mark.parametrize("slots, filled", [(1, 1), (2, 1), (3, 3), (5, 2), (10, 7), (10, 10), (20, 20)])
def test_woodbury_matches_direct_solve(slots, filled, damping):
    """float64 history, full and partly filled (zero rows for the unfilled slots), with the
    current gradient in a middle slot of a wrapped ring buffer too."""
    gen = torch.Generator().manual_seed(slots * 100 + filled)
    history = torch.zeros(slots, 6, 7, dtype=torch.float64)
    history[:filled] = torch.randn(filled, 6, 7, generator=gen, dtype=torch.float64) * 2
    for current in {filled - 1, filled // 2}:
        got = inverse_fisher_product(history, current, damping)
        expected = direct_solve(history, current, damping)
        assert got.dtype == torch.float64
        assert (got - expected).norm() / expected.norm() < 1e-6
    # The unfilled slots change nothing: same as the Woodbury of the filled part alone.
    alone = inverse_fisher_product(history[:filled].clone(), filled - 1, damping)
    padded = inverse_fisher_product(history, filled - 1, damping)
    assert (alone - padded).norm() <= 1e-9 * alone.norm()


def test_woodbury_fp32_history_is_accurate_to_fp32_rounding():
    """An fp32 history (what an fp32 model stores): ~1e-7 against the exact solve of the same
    fp32 numbers, where the literal fp32 formula g/λ - Hz/λ² loses ~1e-2."""
    gen = torch.Generator().manual_seed(7)
    history = torch.randn(10, 40, 30, generator=gen) * 0.1
    got = inverse_fisher_product(history, 4, 1e-3)
    expected = direct_solve(history, 4, 1e-3)
    assert got.dtype == torch.float32
    assert (got.double() - expected).norm() / expected.norm() < 1e-5


# ---------------------------------------------------------------------------- the formula
def natural_galore_reference(
    weights, grad_steps, *, rank, gap, scale, lr, betas, eps, weight_decay, history, damping, on_refresh
):
    """docs/methods/galore.md#update-rule and docs/methods/natural_galore.md#update-rule, one matrix at a time: GaLore's std side, the top-r singular
    vectors every ``gap`` steps; the FIFO of the last ``history`` projected gradients (the
    current one included) as the columns of H; ĝ = (λI + H H^T)^{-1} g by a dense solve;
    Adam on ĝ with torch.optim.AdamW's eps placement; decay before the update.  At a refresh
    the stored gradients are dropped (``clear``) or mapped into the new basis (``project``)."""
    beta1, beta2 = betas
    out = []
    for i, w in enumerate(weights):
        w = w.detach().clone()
        right = w.shape[0] >= w.shape[1]
        basis, stored, exp_avg, exp_avg_sq = None, [], None, None
        for t, grads in enumerate(grad_steps):
            g = grads[i]
            if t % gap == 0:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                new = vh[:rank] if right else u[:, :rank]
                if basis is not None and on_refresh == "clear":
                    stored = []
                elif basis is not None:
                    stored = [x @ (basis @ new.T) if right else (new.T @ basis) @ x for x in stored]
                basis = new
            r = g @ basis.T if right else basis.T @ g
            stored = (stored + [r])[-history:]  # FIFO: the oldest leaves
            h = torch.stack([x.flatten().double() for x in stored], dim=1)  # k x s
            fisher = damping * torch.eye(h.shape[0], dtype=torch.float64) + h @ h.T
            nat = torch.linalg.solve(fisher, r.flatten().double()).float().view_as(r)
            if exp_avg is None:
                exp_avg, exp_avg_sq = torch.zeros_like(r), torch.zeros_like(r)
            exp_avg = beta1 * exp_avg + (1 - beta1) * nat
            exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * nat * nat
            k = t + 1
            n = (exp_avg / (1 - beta1**k)) / ((exp_avg_sq / (1 - beta2**k)).sqrt() + eps)
            back = n @ basis if right else basis @ n
            w = w * (1 - lr * weight_decay) - lr * scale * back
        out.append(w)
    return out


HYPER = dict(
    rank=4, gap=4, scale=0.37, lr=5e-3, betas=(0.85, 0.97), eps=1e-8, weight_decay=0.1, history=3, damping=0.05
)


def run_both(steps, **overrides):
    hyper = {**HYPER, **overrides}
    mats, _ = twin_params(seed=11)
    mats = mats[:2]
    start = [m.detach().clone() for m in mats]
    opt = NaturalGaLoreAdamW(
        [{"params": mats, "rank": hyper["rank"], "update_proj_gap": hyper["gap"], "scale": hyper["scale"]}],
        lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"], weight_decay=hyper["weight_decay"],
        history=hyper["history"], damping=hyper["damping"], history_on_refresh=hyper["on_refresh"],
        projector="svd",  # the reference's exact SVD
    )
    grad_steps = [grads_for(t, SHAPES) for t in range(steps)]
    for grads in grad_steps:
        for p, g in zip(mats, grads):
            p.grad = g.clone()
        opt.step()
    return mats, natural_galore_reference(start, grad_steps, **hyper)


@pytest.mark.parametrize("on_refresh", ["clear", "project"])
@pytest.mark.parametrize("steps", [1, 10])
def test_update_matches_readable_reference(steps, on_refresh):
    """One step, and ten (the 3-slot FIFO wraps, two refreshes), a right- and a left-projected
    matrix, non-default damping/rank/scale/betas/decay."""
    ours, expected = run_both(steps, on_refresh=on_refresh)
    for p, q in zip(ours, expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


def test_clear_and_project_give_different_trajectories():
    """So the two reference runs above each check their own refresh rule."""
    cleared, _ = run_both(10, on_refresh="clear")
    projected, _ = run_both(10, on_refresh="project")
    for p, q in zip(cleared, projected):
        assert not torch.allclose(p, q, rtol=1e-4, atol=1e-5)


def test_preconditioning_changes_the_update():
    """Against GaLore (same everything, no Fisher): a different trajectory, so the reference
    test above does exercise the preconditioner."""
    ours, _ = run_both(3, on_refresh="clear")
    _, plain = run_both(3, on_refresh="clear", damping=1e6)  # λ huge: ĝ ∝ g, Adam is scale-free
    for p, q in zip(ours, plain):
        assert not torch.allclose(p.detach(), q, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------- the history
def one_matrix(history=3, gap=100, **kw):
    w = torch.nn.Parameter(torch.randn(24, 10, generator=torch.Generator().manual_seed(2)))
    opt = NaturalGaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": gap}], history=history, **kw)
    return w, opt


def test_fifo_drops_the_oldest():
    """history=3, five steps in one subspace: slots hold steps 3, 4, 2 (slot = count % 3)."""
    w, opt = one_matrix(history=3)
    lows = []
    for t in range(5):
        w.grad = grads_for(t, [(24, 10)])[0]
        opt.step()
        basis = opt.state[w]["projector"]["right"]
        lows.append(w.grad @ basis.T)
    state = opt.state[w]
    assert state["grad_history_count"] == 5
    assert state["grad_history"].shape == (3, 24, 3)
    for slot, t in enumerate([3, 4, 2]):
        torch.testing.assert_close(state["grad_history"][slot], lows[t], rtol=1e-6, atol=1e-6)


def test_history_is_cleared_at_a_refresh():
    w, opt = one_matrix(history=4, gap=3, history_on_refresh="clear")
    for t in range(4):  # steps 0..2 in the first subspace, step 3 refreshes
        w.grad = grads_for(t, [(24, 10)])[0]
        opt.step()
    state = opt.state[w]
    basis = state["projector"]["right"]
    assert state["grad_history_count"] == 1
    torch.testing.assert_close(state["grad_history"][0], w.grad @ basis.T)
    assert not state["grad_history"][1:].any()


def test_history_is_re_expressed_at_a_refresh():
    w, opt = one_matrix(history=4, gap=3, history_on_refresh="project")
    for t in range(3):
        w.grad = grads_for(t, [(24, 10)])[0]
        opt.step()
    old_basis = opt.state[w]["projector"]["right"].clone()
    old_history = opt.state[w]["grad_history"].clone()
    w.grad = grads_for(3, [(24, 10)])[0]
    opt.step()  # refresh
    state = opt.state[w]
    new_basis = state["projector"]["right"]
    assert not torch.allclose(new_basis, old_basis)
    assert state["grad_history_count"] == 4
    for slot in range(3):  # R_old Q_old Q_new^T: the old gradients in the new coordinates
        torch.testing.assert_close(state["grad_history"][slot], old_history[slot] @ old_basis @ new_basis.T)
    torch.testing.assert_close(state["grad_history"][3], w.grad @ new_basis.T)


@pytest.mark.parametrize("proj_type", ["full", "left"])
def test_two_sided_projection_keeps_an_r_by_r_history(proj_type):
    """proj_type='full' is the reference's two-sided (Tucker) projection."""
    w, opt = one_matrix(history=2, gap=2, proj_type=proj_type)
    for t in range(5):
        w.grad = grads_for(t, [(24, 10)])[0]
        opt.step()
    shape = (3, 3) if proj_type == "full" else (3, 10)
    assert opt.state[w]["grad_history"].shape == (2, *shape)
    assert torch.isfinite(w).all()


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("history_on_refresh", ["project", "clear"])
def test_training_a_small_model_lowers_the_loss(history_on_refresh):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x = torch.randn(128, 16)
    y = x[:, :4] * 2 - x[:, 4:8]
    matrices = [model[0].weight, model[2].weight]
    others = [model[0].bias, model[2].bias]
    opt = NaturalGaLoreAdamW(
        [{"params": matrices, "rank": 4, "update_proj_gap": 10}, {"params": others}],
        lr=3e-2, scale=1.0, weight_decay=0.0, history_on_refresh=history_on_refresh,
    )
    losses = mse_losses(model, opt, x, y, 60)
    assert all(torch.isfinite(torch.tensor(losses)))
    # Full-batch gradients change little from step to step, so the empirical Fisher mostly
    # damps the gradient's own direction: slower than GaLore here (3.4 vs 0.2 after 60 steps at lr 1e-2),
    # but the loss falls steadily.
    assert losses[-1] < 0.2 * losses[0]
    assert losses[30] < losses[0] and losses[-1] < losses[30]


# ---------------------------------------------------------------------------- validation
def mats():
    return [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(5, 12))]


BAD_INPUTS = [
    (dict(damping=0), "NaturalGaLoreAdamW: invalid damping=0 in the constructor: must be a finite number > 0"),
    (dict(damping=-1e-3), "NaturalGaLoreAdamW: invalid damping=-0.001 in the constructor"),
    (dict(damping=float("nan")), "NaturalGaLoreAdamW: invalid damping=nan"),
    (dict(history=0), "NaturalGaLoreAdamW: invalid history=0 in the constructor: must be an integer >= 1"),
    (dict(history=2.5), "NaturalGaLoreAdamW: invalid history=2.5"),
    (dict(history=True), "NaturalGaLoreAdamW: invalid history=True"),
    (
        dict(history_on_refresh="keep"),
        "NaturalGaLoreAdamW: invalid history_on_refresh='keep' in the constructor: must be one of 'project', 'clear'",
    ),
]


@pytest.mark.parametrize("kw, message", BAD_INPUTS, ids=[m.split(": invalid ")[1].split(" ")[0] for _, m in BAD_INPUTS])
def test_bad_constructor_values_raise(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        NaturalGaLoreAdamW([{"params": mats(), "rank": 2}], **kw)


def test_bad_group_values_raise():
    with pytest.raises(ValueError, match=re.escape("NaturalGaLoreAdamW: invalid damping=0 in param group 1")):
        NaturalGaLoreAdamW([{"params": mats()[:1], "rank": 2}, {"params": mats()[1:], "rank": 2, "damping": 0}])
    with pytest.raises(ValueError, match=re.escape("NaturalGaLoreAdamW: invalid history=0 in param group 0")):
        NaturalGaLoreAdamW([{"params": mats(), "rank": 2, "history": 0}])


# ---------------------------------------------------------------------------- resume
@pytest.mark.parametrize("history_on_refresh", ["project", "clear"])
def test_resume_through_weights_only_load_is_bit_identical(history_on_refresh):
    """Save mid-period with a partly wrapped FIFO, load with weights_only=True, continue
    across two refreshes: weights and every state entry equal."""
    def build(params):
        return NaturalGaLoreAdamW(
            [{"params": params[:2], "rank": 3, "update_proj_gap": 3}, {"params": params[2:]}],
            lr=1e-2, history=4, damping=1e-2, history_on_refresh=history_on_refresh,
        )

    def run(opt, params, start, stop):
        for t in range(start, stop):
            for p, g in zip(params, grads_for(t, [tuple(p.shape) for p in params])):
                p.grad = g
            opt.step()

    a, b = twin_params(seed=3)
    pa, pb = [a[0], a[1], a[3]], [b[0], b[1], b[3]]
    opt = build(pa)
    run(opt, pa, 0, 5)
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in pa], "optim": opt.state_dict()}, buffer)
    run(opt, pa, 5, 11)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    with torch.no_grad():
        for p, v in zip(pb, saved["model"]):
            p.copy_(v)
    opt2 = build(pb)
    opt2.load_state_dict(saved["optim"])
    run(opt2, pb, 5, 11)
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    for p, q in zip(pa, pb):
        sa, sb = opt.state[p], opt2.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
            elif key != "projector":
                assert sa[key] == sb[key], key
    assert opt.state[pa[0]]["grad_history_count"] == opt2.state[pb[0]]["grad_history_count"] > 0


# ---------------------------------------------------------------------------- no host sync
