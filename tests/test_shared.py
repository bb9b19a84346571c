"""Tests every optimizer configuration in conftest.OPTIMIZER_CASES must pass."""
from __future__ import annotations

import io

import pytest
import torch

import lowrank_optim as lo
from conftest import OPTIMIZER_CASES, NoHostSync, assert_same_state, fake_grads, make_params, state_tensors


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
    """docs/guide.md#conventions-for-contributors: no host syncs in the step.  A refresh may sync (its finiteness check, the
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


# ---------------------------------------------------------------- after the happy path
def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_like_the_original(optimizer_case, how):
    """copy.deepcopy(opt) and torch.save(opt)/torch.load(weights_only=False) keep every
    option: the copy then trains its own parameters exactly as the original does."""
    import copy

    _, build = optimizer_case
    mats, bias = make_params()
    opt = build(mats, bias)
    run(opt, [*mats, bias], 2)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert all(p is not q for p, q in zip(all_params(opt), all_params(twin)))
    run(opt, all_params(opt), 4, start=2)
    run(twin, all_params(twin), 4, start=2)
    for p, q in zip(all_params(opt), all_params(twin)):
        assert torch.equal(p, q)
    assert_same_state(opt, twin)
    # and the copy's checkpoint loads into a fresh optimizer (torch's __setstate__ adds a
    # "differentiable" default, which is no option of ours and must not reach the groups)
    fresh = build(*make_params())
    fresh.load_state_dict(twin.state_dict())
    assert [sorted(g) for g in fresh.param_groups] == [sorted(g) for g in opt.param_groups]


def float_state(opt, p):
    state = opt.state[p]
    found = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    found.update({("projector", k): v for k, v in state.get("projector", {}).items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()})
    return found


@pytest.mark.parametrize("saved_dtype,loaded_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_resume_into_another_dtype(optimizer_case, saved_dtype, loaded_dtype):
    """A checkpoint of an fp32 model resumes in a bf16 one (and back): the state that
    follows the parameter's dtype is cast, the rest keeps its own; training goes on."""
    _, build = optimizer_case
    mats, bias = make_params(dtype=saved_dtype)
    opt = build(mats, bias)
    run(opt, [*mats, bias], 4)
    saved = opt.state_dict()
    mats2, bias2 = make_params(dtype=loaded_dtype)
    with torch.no_grad():
        for p, q in zip([*mats2, bias2], [*mats, bias]):
            p.copy_(q)
    opt2 = build(mats2, bias2)
    opt2.load_state_dict(saved)
    native = build(*make_params(dtype=loaded_dtype))  # what a run in loaded_dtype keeps
    run(native, all_params(native), 4)
    for p, q in zip(all_params(opt2), all_params(native)):
        dtypes = {k: v.dtype for k, v in float_state(opt2, p).items()}
        assert dtypes == {k: v.dtype for k, v in float_state(native, q).items()}
    before = [p.detach().clone() for p in mats2]
    run(opt2, [*mats2, bias2], 4, start=4)
    for p, b in zip(mats2, before):
        assert p.dtype == loaded_dtype and torch.isfinite(p).all() and not torch.equal(p, b)


@pytest.mark.parametrize("at_step", [0, 3], ids=["first_refresh", "later_refresh"])
def test_nonfinite_gradient_at_a_refresh_skips_the_step(optimizer_case, at_step):
    """With every projector, a NaN gradient at a refresh (gap 3: steps 0 and 3) leaves the
    weight and the state untouched, with a warning; the other parameters step."""
    _, build = optimizer_case
    mats, bias = make_params()
    opt = build(mats, bias)
    run(opt, [*mats, bias], at_step)
    fake_grads([*mats, bias], at_step)
    mats[0].grad[1, 2] = float("nan")
    weight, other = mats[0].detach().clone(), mats[1].detach().clone()
    state = {k: v.clone() for k, v in float_state(opt, mats[0]).items()}
    with pytest.warns(RuntimeWarning, match="refresh skipped.*non-finite"):
        opt.step()
    assert torch.equal(mats[0], weight) and not torch.equal(mats[1], other)
    after = float_state(opt, mats[0])
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    run(opt, [*mats, bias], 3, start=at_step + 1)
    assert torch.isfinite(mats[0]).all() and not torch.equal(mats[0], weight)
    assert all(torch.isfinite(v).all() for v in float_state(opt, mats[0]).values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["float64", "float16"])
def test_float64_and_float16_parameters_train(optimizer_case, dtype):
    """float64 weights train in float64; fp16 projected weights stay finite (their low-rank
    rule runs in fp32: fp16 squares underflow and eps=1e-8 rounds to 0)."""
    name, build = optimizer_case
    mats, bias = make_params(dtype=dtype)
    opt = build(mats, bias)
    start = [m.detach().clone() for m in mats]
    run(opt, [*mats, bias], 4)
    for m, s in zip(mats, start):
        assert m.dtype == dtype and torch.isfinite(m).all() and not torch.equal(m, s), name
    for key in type(opt).param_dtype_state_keys:
        if key in opt.state[mats[0]] and opt.state[mats[0]][key].numel():
            expected = torch.float32 if dtype == torch.float16 else dtype
            assert opt.state[mats[0]][key].dtype == expected, key


def other_class(opt):
    return lo.DCTAdamW if type(opt) is lo.GaLoreAdamW else lo.GaLoreAdamW


def test_checkpoint_of_another_class_is_refused_unless_not_strict(optimizer_case):
    _, build = optimizer_case
    mats, bias = make_params()
    opt = build(mats, bias)
    run(opt, [*mats, bias], 2)
    saved = opt.state_dict()
    cls = other_class(opt)
    target = cls([{"params": make_params()[0], "rank": 3}, {"params": [make_params()[1]]}])
    with pytest.raises(ValueError, match=rf"{cls.__name__}: the checkpoint was saved by {type(opt).__name__}"):
        target.load_state_dict(saved)
    assert not target.state


def test_checkpoint_of_torch_adamw_is_refused(optimizer_case):
    _, build = optimizer_case
    mats, bias = make_params()
    adamw = torch.optim.AdamW([{"params": mats}, {"params": [bias]}])
    run(adamw, [*mats, bias], 1)
    opt = build(*make_params())
    with pytest.raises(ValueError, match=r"param group 0 of the checkpoint has keys .*'amsgrad'.*another optimizer"):
        opt.load_state_dict(adamw.state_dict())
    assert not opt.state and lo.projectors.is_projected(opt.param_groups[0])


def layout_key(group):
    return "rank" if group["rank"] is not None else "density"


def test_checkpoint_with_another_rank_is_refused_unless_not_strict(optimizer_case):
    _, build = optimizer_case
    mats, bias = make_params()
    opt = build(mats, bias)
    run(opt, [*mats, bias], 2)
    saved = opt.state_dict()
    key = layout_key(opt.param_groups[0])
    mats2, bias2 = make_params()
    other = build(mats2, bias2)
    other.param_groups[0][key] = 2 if key == "rank" else 0.25
    with pytest.raises(ValueError, match=rf"param group 0 of the checkpoint has {key}=.*built with {key}="):
        other.load_state_dict(saved)
    assert not other.state
    other.load_state_dict(saved, strict=False)  # the deliberate override: the checkpoint's wins
    assert other.param_groups[0][key] == opt.param_groups[0][key]
    run(other, [*mats2, bias2], 2, start=2)
    assert all(torch.isfinite(p).all() for p in mats2)


@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("rank", 0), ("weight_decay", -1.0), ("betas", (1.5, 0.9))])
def test_checkpoint_with_values_the_constructor_refuses_is_refused(optimizer_case, key, value):
    _, build = optimizer_case
    mats, bias = make_params()
    opt = build(mats, bias)
    run(opt, [*mats, bias], 1)
    saved = opt.state_dict()
    if key not in saved["param_groups"][0]:
        pytest.skip(f"{type(opt).__name__} has no {key}")
    if key == "rank" and saved["param_groups"][0]["rank"] is None:
        key = "density"
    saved["param_groups"][0][key] = value
    fresh = build(*make_params())
    with pytest.raises(ValueError, match=rf"invalid {key}=.*param group 0.*loading a checkpoint"):
        fresh.load_state_dict(saved)
    assert not fresh.state


def test_checkpoint_of_a_model_with_other_shapes_is_refused(optimizer_case):
    _, build = optimizer_case
    mats, bias = make_params()
    opt = build(mats, bias)
    run(opt, [*mats, bias], 2)
    other = [torch.nn.Parameter(torch.randn(20, 10)), torch.nn.Parameter(torch.randn(9, 31))]
    target = build(other, torch.nn.Parameter(torch.randn(7)))
    with pytest.raises(ValueError, match=r"state of parameter #0 \(shape \(20, 10\)\) in param group 0 does not fit"):
        target.load_state_dict(opt.state_dict())
    assert not target.state


@pytest.mark.parametrize("cls", ADAM_CLASSES, ids=lambda c: c.__name__)
def test_complex_parameters_in_dense_groups_are_torch_adamw_bit_for_bit(cls):
    """Real and imaginary parts as pairs (view_as_real), as torch.optim.AdamW does."""
    gen = torch.Generator().manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.cfloat, generator=gen))
    ref = torch.nn.Parameter(ours.detach().clone())
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05)
    opt, torch_opt = cls([ours], **kw), torch.optim.AdamW([ref], foreach=False, **kw)
    for t in range(5):
        grad = torch.randn(6, 5, dtype=torch.cfloat, generator=gen)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
    assert torch.equal(ours, ref) and ours.imag.abs().sum() > 0


def test_bulk_and_per_parameter_paths_agree(optimizer_case, monkeypatch):
    """The bulk path (a group's parameters stepped together, the moment rule's foreach
    kernels) and the per-parameter path (foreach=False) give the same training, across
    refreshes (gap 3) and every on_refresh mode of the table."""
    _, build = optimizer_case
    bulk_sizes = []
    original = lo.optim.base.LowRankOptimizer._step_many

    def recording(self, params, *args):
        bulk_sizes.append(len(params))
        return original(self, params, *args)

    monkeypatch.setattr(lo.optim.base.LowRankOptimizer, "_step_many", recording)
    runs = []
    for foreach in (None, False):
        mats, bias = make_params()
        opt = build(mats, bias)
        opt.foreach = foreach
        run(opt, [*mats, bias], 8)
        runs.append((opt, [*mats, bias]))
    assert bulk_sizes and all(n >= 1 for n in bulk_sizes)  # the first run took the bulk path
    (bulk, bulk_params), (single, single_params) = runs
    for p, q in zip(bulk_params, single_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    fa, fb = state_tensors(bulk), state_tensors(single)
    assert fa.keys() == fb.keys()
    for key, value in fa.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(value, fb[key], rtol=1e-6, atol=1e-6)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, fb[key]), key
        else:
            assert value == fb[key], key


#: Which classes step the matrices of a projected group together (the bulk path): those that
#: keep every projection hook at its default; a method with hooks steps them one at a time.
BULK_PROJECTED = {lo.GaLoreAdamW: True, lo.DCTAdamW: True, lo.GaLoreAdamW8bit: True, lo.GaLoreAdafactor: True,
                  lo.FiraAdamW: False, lo.FrugalAdamW: False, lo.ApolloAdamW: False,
                  lo.NaturalGaLoreAdamW: False, lo.GradNormLoRPAdamW: False}


@pytest.mark.parametrize("cls", BULK_PROJECTED, ids=lambda cls: cls.__name__)
def test_which_methods_step_projected_groups_in_bulk(cls, monkeypatch):
    """The bulk path takes a projected group's two matrices together (and the dense group's
    bias) where the class allows it; foreach=False steps every parameter on its own."""
    seen = []
    original = lo.optim.base.LowRankOptimizer._step_many
    monkeypatch.setattr(lo.optim.base.LowRankOptimizer, "_step_many",
                        lambda self, params, *a: (seen.append(len(params)), original(self, params, *a))[1])
    mats, bias = make_params()
    opt = cls([{"params": mats, "rank": 3}, {"params": [bias]}])
    fake_grads([*mats, bias], 0)
    opt.step()
    assert seen == ([2, 1] if BULK_PROJECTED[cls] else [1])
    seen.clear()
    opt.foreach = False
    opt.step()
    assert seen == []
