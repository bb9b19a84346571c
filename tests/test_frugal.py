"""FRUGAL: exact gradient splitting, coordinate and block projectors, state-free rules."""
from __future__ import annotations

import io

import pytest
import torch

import lowrank_optim as lo
import lowrank_optim.projectors.coords  # noqa: F401  (registers columns/rows/entries/blocks)
from conftest import assert_same_state, fake_grads
from lowrank_optim.optim.base import ParamStep
from lowrank_optim.optim.frugal import FrugalAdamW

SHAPES = [(24, 10), (9, 31)]
COORDS = ["columns", "rows", "entries"]


def matrices(count=2, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shapes[i % len(shapes)], generator=gen)) for i in range(count)]


def frugal(params, projector, gap=3, density=0.5, projector_args=None, **kw):
    group = {"params": params, "projector": projector, "update_proj_gap": gap, "projector_args": projector_args}
    group.update(rank=3) if projector in ("svd", "rsvd", "random") else group.update(density=density)
    return FrugalAdamW([group], **kw)


def selection(opt, p):
    """The 0/1 mask S of the coordinates Adam updates at the current step."""
    pstate = opt.state[p]["projector"]
    mask = torch.zeros(p.shape, dtype=torch.bool)
    if "active" in pstate:
        mask[:] = bool(pstate["active"])
        return mask
    idx, name = pstate["indices"].long(), opt.param_groups[0]["projector"]
    if name == "columns":
        mask[:, idx] = True
    elif name == "rows":
        mask[idx] = True
    else:
        mask.view(-1)[idx] = True
    return mask


def state_bytes(value):
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def reference_frugal(w, grads, masks, gap, lr, betas, eps, wd, lr_f, rule):
    """docs/methods/frugal.md#update-rule on full matrices with a 0/1 selection mask S per step:
    g_s = S*G; AdamW on g_s, moments reset at each refresh (steps 0, T, 2T, ...);
    E = (1-S)*G; W <- W(1 - lr wd) - lr * adam - lr_f * F(E)."""
    beta1, beta2 = betas
    w = w.clone()
    for t, (g, s) in enumerate(zip(grads, masks)):
        if t % gap == 0:
            m, v, k = torch.zeros_like(w), torch.zeros_like(w), 0
        k += 1
        gs = g * s
        m = beta1 * m + (1 - beta1) * gs
        v = beta2 * v + (1 - beta2) * gs * gs
        adam = (m / (1 - beta1**k)) / ((v / (1 - beta2**k)).sqrt() + eps)
        e = g * ~s
        free = {"signsgd": e.sign(), "sgd": e, "none": torch.zeros_like(e)}[rule]
        w = w * (1 - lr * wd) - lr * adam - lr_f * free
    return w


# ------------------------------------------------------------------------ exact split
@pytest.mark.parametrize("rule", ["signsgd", "sgd", "none"])
@pytest.mark.parametrize("projector", COORDS + ["blocks"])
def test_index_modes_match_a_direct_computation(projector, rule):
    params = matrices(4)
    start = [p.detach().clone() for p in params]
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1, inactive_lr_scale=0.5)
    opt = frugal(params, projector, gap=3, state_free=rule, **kw)
    grads, masks = [], []
    for t in range(8):  # crosses two refreshes
        fake_grads(params, t)
        grads.append([p.grad.clone() for p in params])
        opt.step()
        masks.append([selection(opt, p) for p in params])
    for i, p in enumerate(params):
        expected = reference_frugal(
            start[i], [g[i] for g in grads], [m[i] for m in masks], 3,
            kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"], kw["lr"] * 0.5, rule,
        )
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("projector", COORDS + ["blocks"])
def test_adam_part_and_signsgd_part_split_the_coordinates_exactly(projector):
    """Selected coordinates move exactly as without the state-free rule; the others move by
    exactly -lr_f sign(G) (no weight decay)."""
    runs = {}
    for rule in ("none", "signsgd"):
        params = matrices(4)
        opt = frugal(params, projector, state_free=rule, lr=1e-2, weight_decay=0.0, inactive_lr_scale=0.3)
        fake_grads(params, 0)
        before = [p.detach().clone() for p in params]
        opt.step()
        runs[rule] = (params, before, [selection(opt, p) for p in params])
    (adam_only, before, masks), (both, _, _) = runs["none"], runs["signsgd"]
    for p_adam, p_both, b, s in zip(adam_only, both, before, masks):
        assert torch.equal(p_both[s], p_adam[s])
        assert torch.equal(p_adam[~s], b[~s])  # Adam never touches the unselected ones
        assert torch.equal(p_both[~s], b.sub(p_both.grad.sign() * (1e-2 * 0.3))[~s])
    assert any(s.any() for s in masks) and any((~s).any() for s in masks)


@pytest.mark.parametrize("projector", ["svd", "rsvd", "random"])
@pytest.mark.parametrize("rule", ["signsgd", "sgd"])
def test_basis_modes_keep_the_state_free_update_in_the_orthogonal_complement(projector, rule):
    params = matrices(2)
    opt = frugal(params, projector, state_free=rule, weight_decay=0.0)
    fake_grads(params, 0)
    opt.step()
    for p in params:
        state, group = opt.state[p], opt.param_groups[0]
        proj = lo.optim.base.make_projector(group)
        low = proj.project(p.grad, state["projector"])
        free = opt.state_free_update(ParamStep(p, p.grad, low, low, state, group, proj))
        back = lambda x: proj.project_back(proj.project(x, state["projector"]), state["projector"])  # noqa: E731
        assert back(free).norm() < 1e-5 * free.norm()
        # The reference applies sign(E) as is: a visible part of it lies in the subspace.
        leak = back((p.grad - back(p.grad)).sign())
        if rule == "signsgd":
            assert leak.norm() > 0.05 * (p.grad - back(p.grad)).sign().norm()
            torch.testing.assert_close(free, ((p.grad - back(p.grad)).sign() - leak) * group["lr"])
        else:
            torch.testing.assert_close(free, (p.grad - back(p.grad)) * group["lr"])


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_basis_mode_adam_part_lies_in_the_subspace(proj_type):
    params = [torch.nn.Parameter(p.detach().double()) for p in matrices(2)]  # delta without fp32 cancellation
    opt = FrugalAdamW([{"params": params, "rank": 3, "proj_type": proj_type}], state_free="none", weight_decay=0.0)
    fake_grads(params, 0)
    before = [p.detach().clone() for p in params]
    opt.step()
    proj = lo.optim.base.make_projector(opt.param_groups[0])
    for p, b in zip(params, before):
        delta, pstate = p.detach() - b, opt.state[p]["projector"]
        inside = proj.project_back(proj.project(delta, pstate), pstate)
        assert (delta - inside).norm() < 1e-6 * delta.norm()  # the basis is fp32-orthonormal


def test_frugal_rejects_a_non_orthogonal_random_basis():
    with pytest.raises(ValueError, match=r"in param group 0 is not an orthogonal projection"):
        FrugalAdamW(
            [{"params": matrices(1), "rank": 2, "projector": "random", "projector_args": {"distribution": "gaussian"}}]
        )


# ------------------------------------------------------------------------ state sizes
@pytest.mark.parametrize(
    "projector,low_shape",
    [("columns", (24, 5)), ("rows", (12, 10)), ("entries", (120,))],
)
def test_coordinate_state_is_sized_by_the_selection(projector, low_shape):
    p = matrices(1, shapes=[(24, 10)])[0]
    opt = frugal([p], projector)
    fake_grads([p], 0)
    opt.step()
    state, k = opt.state[p], low_shape[1] if projector == "columns" else low_shape[0]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == low_shape
    pstate = state["projector"]
    assert pstate["indices"].shape == (k,) and pstate["indices"].dtype == torch.int32
    assert [key for key, v in pstate.items() if isinstance(v, torch.Tensor)] == ["indices"]  # never a dense matrix
    numel = torch.Size(low_shape).numel()
    assert state_bytes(state) == 2 * 4 * numel + 4 * k


def test_rank_sets_the_number_of_coordinates():
    p = matrices(1, shapes=[(24, 10)])[0]
    opt = FrugalAdamW([{"params": [p], "rank": 7, "projector": "entries"}])
    fake_grads([p], 0)
    opt.step()
    assert opt.state[p]["exp_avg"].shape == (7,)


def test_blocks_state_inactive_matrices_hold_no_adam_state():
    params = matrices(4)
    opt = frugal(params, "blocks")
    fake_grads(params, 0)
    opt.step()
    active = [bool(opt.state[p]["projector"]["active"]) for p in params]
    assert sum(active) == 2
    for p, is_active in zip(params, active):
        state = opt.state[p]
        expected = 2 * 4 * p.numel() if is_active else 0
        assert state_bytes(state) == expected
        assert not any(isinstance(v, torch.Tensor) for v in state["projector"].values())  # flags only


# ------------------------------------------------------------------------ blocks
@pytest.mark.parametrize("count,density,active", [(8, 0.25, 2), (8, 0.5, 4), (5, 0.4, 2), (3, 1.0, 3), (4, 0.1, 1)])
@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
def test_blocks_activate_exactly_round_density_times_count(count, density, active, order):
    params = matrices(count, shapes=[(4, 3)])
    opt = frugal(params, "blocks", gap=1, density=density, projector_args={"order": order})
    for t in range(6):
        fake_grads(params, t)
        opt.step()
        assert sum(opt.state[p]["projector"]["active"] for p in params) == active


def active_slots_per_round(order, count=5, density=0.4, rounds=4, rng_seed=0):
    torch.manual_seed(rng_seed)  # a "rank" with its own global RNG state
    params = matrices(count, shapes=[(4, 3)])
    opt = frugal(params, "blocks", gap=2, density=density, projector_args={"order": order})
    seen = []
    for t in range(2 * rounds):
        fake_grads(params, t)
        opt.step()
        if t % 2 == 0:
            seen.append({i for i, p in enumerate(params) if opt.state[p]["projector"]["active"]})
    return seen


def test_blocks_ascending_and_descending_walk_the_group_and_wrap():
    assert active_slots_per_round("ascending") == [{0, 1}, {2, 3}, {4, 0}, {1, 2}]
    assert active_slots_per_round("descending") == [{4, 3}, {2, 1}, {0, 4}, {3, 2}]


def test_blocks_random_order_changes_per_round_and_agrees_across_ranks():
    first = active_slots_per_round("random", count=8, rounds=6, rng_seed=1)
    assert first == active_slots_per_round("random", count=8, rounds=6, rng_seed=2)
    assert len({frozenset(s) for s in first}) > 1


def test_blocks_set_does_not_depend_on_which_params_had_gradients():
    """A matrix without a gradient at a refresh (or for its first steps) joins its group's
    current round when it next steps; the active set stays exactly K."""
    params = matrices(4, shapes=[(4, 3)])
    opt = frugal(params, "blocks", gap=2, projector_args={"order": "ascending"})
    for t in range(9):
        fake_grads(params, t)
        if t == 2 or t < 1:
            params[1].grad = None  # misses the refresh at step 2 and the first step
        if t < 5:
            params[3].grad = None  # first gradient at step 5
        opt.step()
        if t >= 5:
            flags = [opt.state[p]["projector"]["active"] for p in params]
            assert sum(flags) == 2
            r = t // 2
            assert {i for i, f in enumerate(flags) if f} == {(2 * r) % 4, (2 * r + 1) % 4}


def test_inactive_blocks_get_only_the_state_free_rule():
    params = matrices(4)
    opt = frugal(params, "blocks", weight_decay=0.0)
    fake_grads(params, 0)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b in zip(params, before):
        if not opt.state[p]["projector"]["active"]:
            assert opt.state[p]["exp_avg"].numel() == 0
            assert torch.equal(p.detach(), b.sub(p.grad.sign() * 1e-3))


# ------------------------------------------------------------------------ refresh
def three_steps(projector, on_refresh, **kw):
    """Gap 2: refreshes at steps 0 and 2."""
    params = matrices(3, shapes=[(6, 10)])
    opt = frugal(params, projector, gap=2, on_refresh=on_refresh, lr=0.1, **kw)
    history = []
    for t in range(3):
        fake_grads(params, t)
        old = [dict(opt.state[p]["projector"]) if p in opt.state else None for p in params]
        moments = [opt.state[p]["exp_avg"].clone() if p in opt.state else None for p in params]
        opt.step()
        history.append((old, moments))
    return opt, params, history


@pytest.mark.parametrize("on_refresh", ["keep", "project"])
def test_columns_keep_and_project_match_moments_by_index(on_refresh):
    opt, params, history = three_steps("columns", on_refresh)
    (old_states, old_moments) = history[2]
    some_survive = some_new = False
    for p, old, moment in zip(params, old_states, old_moments):
        new_idx, old_idx = opt.state[p]["projector"]["indices"].tolist(), old["indices"].tolist()
        for j, c in enumerate(new_idx):
            carried = 0.9 * moment[:, old_idx.index(c)] if c in old_idx else 0.0
            torch.testing.assert_close(opt.state[p]["exp_avg"][:, j], carried + 0.1 * p.grad[:, c])
            some_survive |= c in old_idx
            some_new |= c not in old_idx
        assert opt.state[p]["step"] == 3  # bias correction continues
    assert some_survive and some_new


def test_columns_reset_restarts_moments_and_bias_correction():
    opt, params, _ = three_steps("columns", "reset")
    for p in params:
        idx = opt.state[p]["projector"]["indices"].long()
        assert opt.state[p]["step"] == 1
        torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * p.grad[:, idx])


@pytest.mark.parametrize("on_refresh", ["keep", "project"])
def test_blocks_keep_carries_active_matrices_and_starts_new_ones_at_zero(on_refresh):
    # N=3, K=2 ascending: round 0 {0, 1}, round 1 {2, 0}.
    opt, params, history = three_steps("blocks", on_refresh, density=0.67, projector_args={"order": "ascending"})
    moments = history[2][1]
    torch.testing.assert_close(opt.state[params[0]]["exp_avg"], 0.9 * moments[0] + 0.1 * params[0].grad)
    assert opt.state[params[1]]["exp_avg"].shape == (0, 10)
    torch.testing.assert_close(opt.state[params[2]]["exp_avg"], 0.1 * params[2].grad)
    assert all(opt.state[p]["step"] == 3 for p in params)


def test_blocks_reset_restarts_every_matrix():
    opt, params, _ = three_steps("blocks", "reset", density=0.67, projector_args={"order": "ascending"})
    torch.testing.assert_close(opt.state[params[0]]["exp_avg"], 0.1 * params[0].grad)
    assert [opt.state[p]["step"] for p in params] == [1, 1, 1]


def test_svd_keep_carries_moments_by_position():
    opt, params, history = three_steps("svd", "keep")
    moments = history[2][1]
    for p, m in zip(params, moments):
        low = opt.state[p]["projector"]["left"].t() @ p.grad  # 6 x 10: left basis
        torch.testing.assert_close(opt.state[p]["exp_avg"], 0.9 * m + 0.1 * low)


@pytest.mark.parametrize("projector", COORDS + ["blocks", "svd", "random"])
def test_none_gradients_across_a_refresh_do_not_crash(projector):
    params = matrices(4)
    opt = frugal(params, projector, gap=2)
    for t in range(7):
        fake_grads(params, t)
        for i in range(len(params)):
            if (t + i) % 3 == 0:
                params[i].grad = None
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)


# ------------------------------------------------------------------------ resume
RESUME_CASES = {
    "columns": dict(projector="columns"),
    "rows": dict(projector="rows", state_free="sgd"),
    "entries_project": dict(projector="entries", on_refresh="project"),
    "blocks_random": dict(projector="blocks"),
    "blocks_descending_keep": dict(projector="blocks", on_refresh="keep", projector_args={"order": "descending"}),
    "svd": dict(projector="svd"),
    "random_keep": dict(projector="random", on_refresh="keep"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_through_weights_only_load_is_bit_identical(case):
    def build(params):
        return frugal(params, lr=1e-2, weight_decay=0.1, **RESUME_CASES[case])

    def run(opt, params, start, steps):
        for t in range(start, start + steps):
            fake_grads(params, t)
            if t == 6:
                params[2].grad = None
            opt.step()

    params = matrices(4)
    opt = build(params)
    run(opt, params, 0, 5)
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params], "optim": opt.state_dict()}, buffer)
    run(opt, params, 5, 6)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    params2 = matrices(4, seed=9)
    with torch.no_grad():
        for p, v in zip(params2, saved["model"]):
            p.copy_(v)
    opt2 = build(params2)
    opt2.load_state_dict(saved["optim"])
    run(opt2, params2, 5, 6)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    assert_same_state(opt, opt2)
    assert [g["steps_taken"] for g in opt2.param_groups] == [11]


# ------------------------------------------------------------------------ defaults, bad inputs
def test_defaults_follow_the_paper():
    d = FrugalAdamW.hyperparameter_defaults()
    assert (d["scale"], d["on_refresh"], d["state_free"], d["inactive_lr_scale"], d["update_proj_gap"]) == (
        1.0, "reset", "signsgd", 1.0, 200
    )
    assert d["decay_after_update"] is False and d["density"] is None and d["rank"] is None


BAD_INPUTS = [
    (dict(state_free="bogus"), r"FrugalAdamW: invalid state_free='bogus' in the constructor: must be one of"),
    (dict(inactive_lr_scale=-1), r"FrugalAdamW: invalid inactive_lr_scale=-1 in the constructor"),
    (dict(density=0), r"FrugalAdamW: invalid density=0 in the constructor"),
    (dict(projector="blocks", density=0.5, projector_args={"order": "sideways"}), r"invalid order='sideways'"),
    (dict(projector="blocks", projector_args={"ordering": "random"}), r"unknown projector_args key.*'ordering'.*order"),
    (dict(projector="blocks", rank=2), r"rank=2 does not apply to the 'blocks' projector"),
    (dict(projector="columns", rank=11), r"rank=11 is larger than the 24x10 matrix's 10 columns allow"),
    (dict(projector="rows", density=0.5, proj_type="left"), r"proj_type='left' does not apply to the 'rows' projector"),
]


@pytest.mark.parametrize("kw,message", BAD_INPUTS, ids=[str(k) for k, _ in BAD_INPUTS])
def test_bad_input_raises_at_construction(kw, message):
    with pytest.raises(ValueError, match=message):
        FrugalAdamW(matrices(1, shapes=[(24, 10)]), **kw)


def test_bad_group_value_names_the_group():
    with pytest.raises(ValueError, match=r"invalid state_free='bogus' in param group 0"):
        FrugalAdamW([{"params": matrices(1), "density": 0.5, "state_free": "bogus"}])


# ------------------------------------------------------------------------ training
@pytest.mark.parametrize("projector", ["blocks", "columns"])
def test_a_small_model_trains(projector):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {"mlp_in": torch.nn.Linear(16, 32), "mlp_mid": torch.nn.Linear(32, 32), "head": torch.nn.Linear(32, 4)}
    )
    teacher = torch.nn.Linear(16, 4)
    x = torch.randn(256, 16)
    y = teacher(x).detach()
    groups = lo.param_groups(model, ("mlp",), rank=None, density=0.5, projector=projector, update_proj_gap=10)
    opt = FrugalAdamW(groups, lr=3e-3, weight_decay=0.0)

    def loss_fn():
        h = torch.tanh(model["mlp_mid"](torch.tanh(model["mlp_in"](x))))
        return torch.nn.functional.mse_loss(model["head"](h), y)

    first = loss_fn().item()
    for _ in range(100):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.3 * first
