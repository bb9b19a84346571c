"""DCT projector and DCTAdamW (docs/methods/dct.md#update-rule): basis, optimal selection, index-only
state, shared cache, moments across a refresh, training, resume, options, FFT and bf16."""
from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

import lowrank_optim as lo
import lowrank_optim.projectors.dct as dct  # registers "dct" (explicit until the package imports it)
from conftest import assert_same_state, fake_grads, make_params, mse_losses
from lowrank_optim.optim.dct import DCTAdamW
from lowrank_optim.projectors.base import LEFT, RIGHT, RefreshFailed
from lowrank_optim.projectors.transition import IndexMap

SIZES = [1, 2, 3, 8, 17, 64, 100]


def reference_basis(n: int) -> torch.Tensor:
    """C (n x n, orthonormal DCT-II basis vectors as columns), straight from the definition."""
    c = torch.empty(n, n, dtype=torch.float64)
    for j in range(n):
        for k in range(n):
            scale = math.sqrt((1 if k == 0 else 2) / n)
            c[j, k] = scale * math.cos(math.pi * (2 * j + 1) * k / (2 * n))
    return c


def with_spectrum(m: int, n: int, columns: dict[int, torch.Tensor], noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """G = S Cᵀ with the given DCT columns S[:, i] (plus small noise elsewhere): a gradient
    whose best DCT subspace is known by construction."""
    gen = torch.Generator().manual_seed(seed)
    s = noise * torch.randn(m, n, generator=gen, dtype=torch.float64)
    for i, column in columns.items():
        s[:, i] = column.double()
    return (s @ reference_basis(n).t()).float()


def reconstruction_error(g: torch.Tensor, c: torch.Tensor, subset, side: int) -> float:
    basis = c[:, list(subset)]
    rec = g @ basis @ basis.t() if side == RIGHT else basis @ basis.t() @ g
    return float((g - rec).square().sum())


def fresh(rank, proj_type="std", **options):
    return lo.projectors.REGISTRY["dct"](rank, proj_type, 10, **options)


# ----------------------------------------------------------------------------- the basis
@pytest.mark.parametrize("n", SIZES)
def test_basis_is_orthonormal_and_is_the_dct_ii(n):
    d64 = dct.dct_matrix(n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(d64 @ d64.t(), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(d64.t() @ d64, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(d64.t(), reference_basis(n), atol=1e-12, rtol=0)  # rows of D = columns of C
    d32 = dct.dct_matrix(n)
    torch.testing.assert_close(d32 @ d32.t(), torch.eye(n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("transform", ["matmul", "fft"])
@pytest.mark.parametrize("n", SIZES)
def test_transform_is_scipy_orthonormal_dct(transform, n):
    scipy_fft = pytest.importorskip("scipy.fft")
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    expected = torch.from_numpy(scipy_fft.dct(x.double().numpy(), type=2, norm="ortho", axis=-1)).float()
    torch.testing.assert_close(dct.dct_rows(x, transform), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1), (33, 17), (17, 1), (64, 100), (7, 257)])
def test_fft_and_matmul_paths_agree(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dct.dct_rows(x, "fft"), dct.dct_rows(x, "matmul"), atol=1e-5, rtol=1e-5)


def test_cache_shares_one_basis_per_size_and_mixed_sizes_train():
    dct.clear_dct_cache()
    assert dct.dct_matrix(10) is dct.dct_matrix(10)
    dct.clear_dct_cache()
    # Right sides of size 10 (twice) and 12, left side of size 9: three sizes, one optimizer.
    shapes = [(24, 10), (40, 10), (9, 31), (17, 12)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = DCTAdamW([{"params": params, "rank": 3, "update_proj_gap": 2}], lr=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    cpu = torch.device("cpu")
    assert sorted(dct.cached_dct_sizes(), key=lambda k: k[0]) == [(size, cpu, torch.float32) for size in (9, 10, 12)]
    # A second optimizer reuses the same tensors rather than building its own.
    before = {key: dct.dct_matrix(*key).data_ptr() for key in dct.cached_dct_sizes()}
    other = [torch.nn.Parameter(torch.randn(30, 10))]
    opt2 = DCTAdamW([{"params": other, "rank": 2}])
    other[0].grad = torch.randn(30, 10)
    opt2.step()
    assert {key: dct.dct_matrix(*key).data_ptr() for key in dct.cached_dct_sizes()} == before


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("transform", ["matmul", "fft"])
@pytest.mark.parametrize(
    "shape,proj_type,rank,side",
    [((7, 5), "std", 2, RIGHT), ((5, 7), "std", 3, LEFT), ((6, 6), "reverse_std", 2, LEFT), ((4, 9), "right", 4, RIGHT)],
)
@pytest.mark.parametrize("seed", range(4))
def test_l2_selection_minimises_reconstruction_error_over_all_subsets(transform, shape, proj_type, rank, side, seed):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    projector = fresh(rank, proj_type, transform=transform)
    pstate = projector.init_state(g.shape, seed=0)
    projector.refresh(g, pstate)
    assert pstate["side"] == side
    size = shape[1] if side == RIGHT else shape[0]
    c = reference_basis(size).float()
    best = min(reconstruction_error(g, c, subset, side) for subset in itertools.combinations(range(size), rank))
    chosen = pstate["right_indices" if side == RIGHT else "left_indices"]
    assert reconstruction_error(g, c, chosen.tolist(), side) <= best + 1e-5 * float(g.square().sum())
    # ...and the projector's own round trip is that reconstruction.
    rec = projector.project_back(projector.project(g, pstate), pstate)
    assert float((g - rec).square().sum()) == pytest.approx(best, abs=1e-4 * float(g.square().sum()))


def test_l1_option_selects_differently_where_it_should():
    """One concentrated column (largest l2 norm) against one spread column (largest l1 norm)."""
    m, n = 6, 4
    g = with_spectrum(m, n, {0: torch.tensor([3.0, 0, 0, 0, 0, 0]), 1: torch.ones(m)}, noise=0.05)
    picked = {}
    for norm in ("l2", "l1"):
        projector = fresh(1, "right", norm=norm)
        pstate = projector.init_state(g.shape, seed=0)
        projector.refresh(g, pstate)
        picked[norm] = pstate["right_indices"].tolist()
    assert picked == {"l2": [0], "l1": [1]}
    c = reference_basis(n).float()
    assert reconstruction_error(g, c, picked["l2"], RIGHT) < reconstruction_error(g, c, picked["l1"], RIGHT)


def test_full_keeps_an_index_set_per_side():
    g = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    projector = fresh(3, "full")
    pstate = projector.init_state(g.shape, seed=0)
    projector.refresh(g, pstate)
    low = projector.project(g, pstate)
    assert low.shape == (3, 3)
    assert pstate["left_indices"].shape == (3,) and pstate["right_indices"].shape == (3,)
    c_left, c_right = reference_basis(12).float(), reference_basis(9).float()
    expected = c_left[:, pstate["left_indices"]].t() @ g @ c_right[:, pstate["right_indices"]]
    torch.testing.assert_close(low, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(projector.project(projector.project_back(low, pstate), pstate), low, atol=1e-5, rtol=1e-5)


def test_non_finite_gradient_keeps_the_old_selection():
    projector = fresh(2)
    g = torch.randn(8, 5)
    pstate = projector.init_state(g.shape, seed=0)
    projector.refresh(g, pstate)
    before = dict(pstate)
    g[0, 0] = float("nan")
    with pytest.raises(RefreshFailed):
        projector.refresh(g, pstate)
    assert pstate == before


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("transform", ["matmul", "fft"])
def test_state_holds_r_integers_per_matrix_and_no_basis(proj_type, transform):
    shapes, rank = [(24, 10), (9, 31), (16, 16)], 3
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = DCTAdamW(
        [{"params": params, "rank": rank, "update_proj_gap": 2, "proj_type": proj_type}],
        projector_args={"transform": transform},
    )
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        state = opt.state[p]
        m, n = p.shape
        side = state["projector"]["side"]
        low_shape = {RIGHT: (m, rank), LEFT: (rank, n)}.get(side, (rank, rank))
        tensors = {}

        def walk(prefix, value):
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(prefix + (k,), v)
            elif isinstance(value, torch.Tensor):
                tensors[prefix] = value

        walk((), state)
        index_keys = {("projector", f"{s}_indices") for s, bit in (("left", LEFT), ("right", RIGHT)) if side & bit}
        assert set(tensors) == {("exp_avg",), ("exp_avg_sq",)} | index_keys
        for key in index_keys:
            assert tensors[key].dtype == torch.int64 and tensors[key].shape == (rank,)
        assert tensors[("exp_avg",)].shape == low_shape and tensors[("exp_avg_sq",)].shape == low_shape


# ----------------------------------------------------------------------------- moments
@pytest.mark.parametrize("side", ["right", "left"])
def test_surviving_indices_keep_their_moments_and_new_ones_start_at_zero(side):
    """Refreshes at steps 0 and 2; the second gradient moves the selection from {0, 1} to {1, 4}."""
    m, n = 8, 6
    first = with_spectrum(m, n, {0: torch.full((m,), 3.0), 1: torch.full((m,), -2.0)}, noise=0.01, seed=1)
    second = with_spectrum(m, n, {1: torch.linspace(1, 3, m), 4: torch.full((m,), 4.0)}, noise=0.01, seed=2)
    if side == "left":
        first, second = first.t().contiguous(), second.t().contiguous()
    key = f"{side}_indices"
    p = torch.nn.Parameter(torch.zeros(first.shape))
    opt = DCTAdamW([{"params": [p], "rank": 2, "update_proj_gap": 2, "proj_type": side}], lr=0.1, weight_decay=0.0)
    for g in (first, first):
        p.grad = g.clone()
        opt.step()
    state = opt.state[p]
    assert state["projector"][key].tolist() == [0, 1]
    m1, v1 = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    p.grad = second.clone()
    opt.step()
    assert state["projector"][key].tolist() == [1, 4]
    projector = dct.DCTProjector(2, side, 2)
    low = projector.project(second, state["projector"])
    moved = projector.transition({**state["projector"], key: torch.tensor([0, 1])}, state["projector"], second)
    assert isinstance(getattr(moved, side), IndexMap) and getattr(moved, "left" if side == "right" else "right") is None
    dim = 1 if side == "right" else 0
    old_at = lambda x, i: x.select(dim, i)  # noqa: E731
    # index 1 sat at position 1 and now sits at position 0; index 4 is new at position 1.
    torch.testing.assert_close(state["exp_avg"].select(dim, 0), 0.9 * old_at(m1, 1) + 0.1 * low.select(dim, 0))
    torch.testing.assert_close(state["exp_avg"].select(dim, 1), 0.1 * low.select(dim, 1))
    torch.testing.assert_close(state["exp_avg_sq"].select(dim, 0), 0.999 * old_at(v1, 1) + 0.001 * low.select(dim, 0) ** 2)
    torch.testing.assert_close(state["exp_avg_sq"].select(dim, 1), 0.001 * low.select(dim, 1) ** 2)


@pytest.mark.parametrize("changing", [False, True], ids=["same_selection", "new_selection"])
def test_keep_matches_moments_by_index_like_project(changing):
    """Coordinates are named by frequency: "keep" must not hand moments over by position."""
    first = with_spectrum(10, 6, {2: torch.full((10,), 3.0), 5: torch.full((10,), 2.0)}, noise=0.01)
    second = with_spectrum(10, 6, {0: torch.full((10,), 3.0), 5: torch.full((10,), 2.0)}, noise=0.01) if changing else first
    results = []
    for on_refresh in ("keep", "project"):
        p = torch.nn.Parameter(torch.zeros(10, 6))
        opt = lo.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 2}], projector="dct", on_refresh=on_refresh)
        for g in (first, first, second, second, second):
            p.grad = g.clone()
            opt.step()
        assert opt.state[p]["projector"]["right_indices"].tolist() == ([0, 5] if changing else [2, 5])
        results.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- training
def teacher_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 24, generator=gen)
    teacher = torch.randn(24, 6, generator=gen) / 5
    return x, torch.tanh(x @ teacher) * 3


#: id -> (builder, the fraction of the first loss the last must fall below).  An r x r
#: ``full`` projection learns more slowly, as it does with the SVD (1.91 of 3.26 there).
BUILDERS = {
    "DCTAdamW": (lambda groups: DCTAdamW(groups, lr=1e-2), 0.3),
    "DCTAdamW_l1_fft": (lambda groups: DCTAdamW(groups, lr=1e-2, projector_args={"norm": "l1", "transform": "fft"}), 0.3),
    "DCTAdamW_full": (
        lambda groups: DCTAdamW([{**g, "proj_type": "full"} if "rank" in g else g for g in groups], lr=1e-2),
        0.6,
    ),
    "GaLoreAdamW_dct": (lambda groups: lo.GaLoreAdamW(groups, lr=1e-2, projector="dct"), 0.3),
    # docs/methods/dct.md#with-fira-and-frugal: the projector plugs into Fira and FRUGAL unchanged.
    "FiraAdamW_dct": (lambda groups: lo.FiraAdamW(groups, lr=1e-2, projector="dct", on_refresh="project"), 0.3),
    "FrugalAdamW_dct": (lambda groups: lo.FrugalAdamW(groups, lr=1e-2, projector="dct"), 0.3),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_trains_a_small_model(name):
    build, target = BUILDERS[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 6))
    weights = [model[0].weight, model[2].weight]
    others = [model[0].bias, model[2].bias]
    opt = build([{"params": weights, "rank": 6, "update_proj_gap": 10}, {"params": others}])
    x, y = teacher_problem()
    losses = mse_losses(model, opt, x, y, 150)
    assert losses[-1] < target * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("transform", ["matmul", "fft"])
def test_bf16_scores_in_fp32_and_trains(transform):
    g = torch.randn(40, 24, generator=torch.Generator().manual_seed(0)).bfloat16()
    projector = fresh(5, transform=transform)
    from_bf16, from_fp32 = projector.init_state(g.shape, 0), projector.init_state(g.shape, 0)
    projector.refresh(g, from_bf16)
    projector.refresh(g.float(), from_fp32)
    assert torch.equal(from_bf16["right_indices"], from_fp32["right_indices"])
    assert projector.project(g, from_bf16).dtype == torch.bfloat16

    mats, bias = make_params(dtype=torch.bfloat16)
    opt = DCTAdamW(
        [{"params": mats, "rank": 3, "update_proj_gap": 2}, {"params": [bias]}],
        lr=1e-2,
        projector_args={"transform": transform},
    )
    start = [m.detach().clone() for m in mats]
    for t in range(5):
        fake_grads([*mats, bias], t)
        opt.step()
    for m, s in zip(mats, start):
        assert m.dtype == torch.bfloat16 and torch.isfinite(m).all() and not torch.equal(m, s)
        assert opt.state[m]["exp_avg"].dtype == torch.bfloat16


def test_fft_and_matmul_optimizers_agree():
    runs = []
    for transform in ("matmul", "fft"):
        mats, bias = make_params()
        opt = DCTAdamW(
            [{"params": mats, "rank": 3, "update_proj_gap": 2}, {"params": [bias]}],
            lr=1e-2,
            projector_args={"transform": transform},
        )
        for t in range(7):
            fake_grads([*mats, bias], t)
            opt.step()
        runs.append((mats, opt))
    (mats_a, opt_a), (mats_b, opt_b) = runs
    for a, b in zip(mats_a, mats_b):
        selected_a, selected_b = opt_a.state[a]["projector"], opt_b.state[b]["projector"]
        for key in ("left_indices", "right_indices"):
            assert (key in selected_a) == (key in selected_b)
            if key in selected_a:
                assert torch.equal(selected_a[key], selected_b[key])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "kw",
    [{}, {"projector_args": {"transform": "fft", "norm": "l1"}}, {"proj_type": "full"}],
    ids=["default", "fft_l1", "full"],
)
def test_resume_through_weights_only_load_is_bit_identical(kw):
    def build(mats, bias):
        group_kw = {k: v for k, v in kw.items() if k != "projector_args"}
        return DCTAdamW(
            [{"params": mats, "rank": 3, "update_proj_gap": 3, **group_kw}, {"params": [bias]}],
            lr=1e-2,
            projector_args=kw.get("projector_args"),
        )

    def run(opt, params, start, steps):
        for t in range(start, start + steps):
            fake_grads(params, t)
            opt.step()

    mats, bias = make_params()
    opt = build(mats, bias)
    run(opt, [*mats, bias], 0, 5)
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in (*mats, bias)], "optim": opt.state_dict()}, buffer)
    run(opt, [*mats, bias], 5, 6)  # crosses two refreshes that change the selection

    dct.clear_dct_cache()  # the resumed run rebuilds the basis: it must be the same bits
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    mats2, bias2 = make_params()
    with torch.no_grad():
        for p, v in zip((*mats2, bias2), saved["model"]):
            p.copy_(v)
    opt2 = build(mats2, bias2)
    opt2.load_state_dict(saved["optim"])
    run(opt2, [*mats2, bias2], 5, 6)
    for p, q in zip((*mats, bias), (*mats2, bias2)):
        assert torch.equal(p, q)
    assert_same_state(opt, opt2)


# ----------------------------------------------------------------------------- validation
def _mats():
    return [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(5, 12))]


@pytest.mark.parametrize(
    "args,message",
    [
        ({"norm": "l3"}, r"invalid norm='l3'.*one of 'l2', 'l1'"),
        ({"transform": "dft"}, r"invalid transform='dft'.*one of 'matmul', 'fft'"),
        ({"nrom": "l2"}, r"unknown projector_args key for projector='dct' 'nrom'; valid ones are: norm, transform"),
    ],
)
@pytest.mark.parametrize("where", ["constructor", "group"])
@pytest.mark.parametrize("cls", ["DCTAdamW", "GaLoreAdamW"])
def test_bad_projector_args_raise_naming_the_key(args, message, where, cls):
    build = {"DCTAdamW": DCTAdamW, "GaLoreAdamW": lambda groups, **kw: lo.GaLoreAdamW(groups, projector="dct", **kw)}[cls]
    with pytest.raises(ValueError, match=message):
        if where == "constructor":
            build([{"params": _mats(), "rank": 2}], projector_args=args)
        else:
            build([{"params": _mats(), "rank": 2, "projector_args": args}])


def test_dct_adamw_defaults():
    opt = DCTAdamW([{"params": _mats(), "rank": 2}])
    group = opt.param_groups[0]
    assert group["projector"] == "dct" and group["on_refresh"] == "project"
    assert group["decay_after_update"] is False  # the reference decays before the update
    with pytest.raises(ValueError, match=r"rank=7 is larger than the 8x6 matrix"):
        DCTAdamW([{"params": _mats(), "rank": 7}])
