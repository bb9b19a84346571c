"""Tests every optimizer configuration in conftest.OPTIMIZER_CASES must pass."""
from __future__ import annotations

import io

import pytest
import torch

import lowrank_optim as lo
from conftest import OPTIMIZER_CASES, NoHostSync, assert_same_state, fake_grads, make_params


def run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        fake_grads(params, t)
        opt.step()


def test_resume_through_weights_only_load_is_bit_identical(optimizer_case):
    """Save at step 5 (mid refresh period), load with weights_only=True, continue: same bits."""
    _, build = optimizer_case
    mats, bias = make_params()
    params = [*mats, bias]
    opt = build(mats, bias)
    run(opt, params, 5)
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params], "optim": opt.state_dict()}, buffer)
    run(opt, params, 6, start=5)  # crosses two more refreshes (gap 3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    mats2, bias2 = make_params()
    params2 = [*mats2, bias2]
    with torch.no_grad():
        for p, v in zip(params2, saved["model"]):
            p.copy_(v)
    opt2 = build(mats2, bias2)
    opt2.load_state_dict(saved["optim"])
    run(opt2, params2, 6, start=5)

    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    assert_same_state(opt, opt2)


def test_state_holds_no_python_objects(optimizer_case):
    _, build = optimizer_case
    mats, bias = make_params()
    opt = build(mats, bias)
    run(opt, [*mats, bias], 2)

    def check(value):
        if isinstance(value, dict):
            for v in value.values():
                check(v)
        else:
            assert isinstance(value, (torch.Tensor, int, float, str, bool, tuple)), type(value)

    check(opt.state_dict()["state"])


def test_closure_runs_with_grad_enabled(optimizer_case):
    _, build = optimizer_case
    mats, bias = make_params()
    opt = build(mats, bias)
    before = [p.detach().clone() for p in mats]

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()
        loss = sum((m @ m.t()).pow(2).mean() for m in mats) + bias.pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, m) for b, m in zip(before, mats))


def test_bf16_parameters_train(optimizer_case):
    """The subspace is computed in fp32 but state and weights stay bf16 and finite."""
    name, build = optimizer_case
    mats, bias = make_params(dtype=torch.bfloat16)
    opt = build(mats, bias)
    start = [m.detach().clone() for m in mats]
    run(opt, [*mats, bias], 4)
    for m, s in zip(mats, start):
        assert m.dtype == torch.bfloat16 and torch.isfinite(m).all() and not torch.equal(m, s)
    basis = opt.state[mats[0]]["projector"].get("right", opt.state[mats[0]]["projector"].get("left"))
    if basis is not None:
        assert basis.dtype == torch.bfloat16


ADAM_CLASSES = [
    lo.GaLoreAdamW, lo.FiraAdamW, lo.FrugalAdamW, lo.DCTAdamW, lo.NaturalGaLoreAdamW, lo.GradNormLoRPAdamW,
]


@pytest.mark.parametrize("cls", ADAM_CLASSES, ids=lambda c: c.__name__)
def test_dense_group_is_torch_adamw_bit_for_bit(cls):
    """A model with no projected group trains exactly as under torch.optim.AdamW, and the
    method keeps none of its own state there (no residual norm, history, magnitude)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Tanh(), torch.nn.Linear(11, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Tanh(), torch.nn.Linear(11, 3))
    twin.load_state_dict(model.state_dict())
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05)
    ours = cls(model.parameters(), **kw)
    ref = torch.optim.AdamW(twin.parameters(), foreach=False, **kw)
    x, y = torch.randn(32, 13), torch.randn(32, 3)
    for _ in range(8):
        for m, opt in ((model, ours), (twin, ref)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(ours.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        assert torch.equal(ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
        assert set(ours.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CASES))
def test_none_gradients_are_skipped(name):
    mats, bias = make_params()
    opt = OPTIMIZER_CASES[name](mats, bias)
    fake_grads(mats[:1], 0)
    opt.step()
    assert mats[1] not in opt.state and bias not in opt.state
    assert opt.state[mats[0]]["step"] == 1


def test_state_holds_no_hidden_memory(optimizer_case):
    """Every state tensor owns storage of exactly its own size: no basis kept as a view of a
    full SVD factor (galore_torch and fira keep the whole n x n factor alive that way)."""
    _, build = optimizer_case
    mats, bias = make_params()
    opt = build(mats, bias)
    run(opt, [*mats, bias], 4)
    for p, state in opt.state.items():
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += [v for v in state.get("projector", {}).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (tuple(p.shape), tuple(t.shape))


def test_steps_between_refreshes_do_no_host_sync(optimizer_case, monkeypatch):
    """DESIGN.md: no host syncs in the step.  A refresh may sync (its finiteness check, the
    SVD); the two steps after it must not."""
    with pytest.raises(AssertionError), NoHostSync():  # the detector sees a Python max on a tensor
        max(torch.tensor(2.0), 1.01)
    _, build = optimizer_case
    mats, bias = make_params()
    opt = build(mats, bias)
    run(opt, [*mats, bias], 1)  # step 0 refreshes
    for name in ("tolist", "numpy"):  # reads that bypass the dispatcher
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host read in the step"))
    with NoHostSync():
        run(opt, [*mats, bias], 2, start=1)  # gap 3: steps 1 and 2 are not refreshes
    if build(*make_params()).param_groups[0]["projector"] in ("svd", "rsvd"):
        with pytest.raises(AssertionError, match="host sync"), NoHostSync():
            run(opt, [*mats, bias], 1, start=3)  # a refresh does sync (finiteness check): the detector sees it
