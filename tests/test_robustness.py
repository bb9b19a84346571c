"""Failed refreshes, non-finite gradients and bf16 must not crash training or corrupt state."""
from __future__ import annotations

import warnings

import pytest
import torch

import lowrank_optim as lo


def setup(projector="svd"):
    p = torch.nn.Parameter(torch.randn(12, 8))
    opt = lo.GaLoreAdamW([{"params": [p], "rank": 3, "update_proj_gap": 2, "projector": projector}], lr=1e-2)
    return p, opt


def step_with(opt, p, grad):
    p.grad = grad
    opt.step()


def test_nonfinite_gradient_at_refresh_keeps_basis_and_state_clean():
    p, opt = setup()
    step_with(opt, p, torch.randn(12, 8))
    step_with(opt, p, torch.randn(12, 8))
    basis = opt.state[p]["projector"]["right"].clone()
    moments = opt.state[p]["exp_avg"].clone()
    weights = p.detach().clone()
    bad = torch.randn(12, 8)
    bad[3, 4] = float("nan")
    with pytest.warns(RuntimeWarning, match="refresh skipped.*non-finite"):
        step_with(opt, p, bad)  # step 2 is a refresh step
    assert torch.equal(opt.state[p]["projector"]["right"], basis)
    assert torch.equal(opt.state[p]["exp_avg"], moments)
    assert torch.equal(p, weights)  # the poisoned step was skipped
    step_with(opt, p, torch.randn(12, 8))  # next step refreshes and trains again
    assert opt.state[p]["projector"]["refreshes"] == 2
    assert torch.isfinite(p).all() and not torch.equal(p, weights)


def test_warning_is_given_once_per_parameter():
    p, opt = setup()
    bad = torch.full((12, 8), float("inf"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            step_with(opt, p, bad)
    assert len([w for w in caught if "refresh skipped" in str(w.message)]) == 1
    assert p.isfinite().all() and opt.state[p]["step"] == 0  # nothing applied without a basis


def test_failed_svd_keeps_previous_basis_and_training_continues(monkeypatch):
    p, opt = setup()
    step_with(opt, p, torch.randn(12, 8))
    basis = opt.state[p]["projector"]["right"].clone()
    step_with(opt, p, torch.randn(12, 8))

    def broken_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated convergence failure")

    monkeypatch.setattr(torch.linalg, "svd", broken_svd)
    before = p.detach().clone()
    with pytest.warns(RuntimeWarning, match="simulated convergence failure"):
        step_with(opt, p, torch.randn(12, 8))
    assert torch.equal(opt.state[p]["projector"]["right"], basis)
    assert not torch.equal(p, before) and torch.isfinite(p).all()  # stepped with the old basis
    assert opt.state[p]["step"] == 3


def test_bf16_model_trains_and_subspace_is_computed_in_fp32(monkeypatch):
    seen = []
    real_svd = torch.linalg.svd

    def recording_svd(a, *args, **kwargs):
        seen.append(a.dtype)
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(torch.bfloat16)
    opt = lo.GaLoreAdamW(
        [{"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 5},
         {"params": [model[0].bias, model[2].bias]}],
        lr=3e-2,
    )
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    y = x[:, :4] * 2
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert seen and all(d == torch.float32 for d in seen)
    assert losses[-1] < 0.5 * losses[0]
