"""APOLLO and APOLLO-Mini: against apollo_torch (bit for bit), the factored update, state
size, presets and layer-wise mode.  The shared tests (resume, copies, dtypes, NaN, misuse,
bulk vs per-parameter) run them through conftest.OPTIMIZER_CASES."""
from __future__ import annotations

import math

import pytest
import torch

import lowrank_optim as lo
from conftest import assert_factored_equals_formed, fake_grads, make_params, product_dtype_curve, twin_params
from lowrank_optim import memory
from lowrank_optim.projectors import REGISTRY
from lowrank_optim.projectors.options import BF16_PRODUCT_MIN_RANK

apollo_torch = pytest.importorskip("apollo_torch")

REFERENCE_RECIPE = dict(eps=1e-6, eps_style="hf", decay_after_update=True, reference_compat=True)
APOLLO_STREAM = {"stream": "apollo"}


@pytest.mark.parametrize("scaling,rank,reference_scale", [("channel", 4, 1.0), ("tensor", 1, 128.0), ("channel", 3, 2.0)])
def test_reference_compat_is_apollo_torch_bit_for_bit(scaling, rank, reference_scale):
    """30 steps with refreshes every 7 (seeds chained as apollo_torch chains them), odd
    and square shapes, weight decay, both scalings; apollo_torch's scale s is our α = √s."""
    ours_params, ref_params = twin_params()
    ref = apollo_torch.APOLLOAdamW(
        [{"params": ref_params[:3], "rank": rank, "update_proj_gap": 7, "scale": reference_scale, "proj": "random",
          "proj_type": "std", "scale_type": scaling}, {"params": ref_params[3:]}],
        lr=1e-2, weight_decay=0.1,
    )
    ours = lo.ApolloAdamW(
        [{"params": ours_params[:3], "rank": rank, "update_proj_gap": 7, "scale": math.sqrt(reference_scale),
          "scaling": scaling, "projector_args": APOLLO_STREAM}, {"params": ours_params[3:]}],
        lr=1e-2, weight_decay=0.1, **REFERENCE_RECIPE,
    )
    assert_steps_like_apollo_torch(ours, ours_params, ref, ref_params, steps=30)


def assert_steps_like_apollo_torch(ours, ours_params, ref, ref_params, steps: int) -> None:
    """Both optimizers step on the same gradients; the weights stay equal bit for bit."""
    for t in range(steps):
        fake_grads(ref_params, t)
        fake_grads(ours_params, t)
        ref.step()
        ours.step()
    for p, q in zip(ours_params, ref_params):
        assert torch.equal(p, q)


class FormedApollo(lo.ApolloAdamW):
    """The factored update checked against its definition: S = G s formed, limited, added."""

    def factored_update(self, step):
        from lowrank_optim.optim import scaling

        dim, ratio = scaling.norm_ratio(step, per_channel=step.group["scaling"] == "channel")
        s = step.grad * ratio
        s = scaling.limit_growth(s, step.state, step.group["norm_growth_limit"], reference=False)
        self.formed = getattr(self, "formed", []) + [s]
        return None, None  # the template then only decays; the formed S is added below

    def _apply_update(self, p, grad, low, update, state, group, projector, layout=None):
        super()._apply_update(p, grad, low, update, state, group, projector, layout)
        p.add_(self.formed[-1], alpha=-update.step_size * group["scale"])


@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_factored_update_is_the_papers_formed_update(scaling):
    """W ← W(1 − ηλ) − η_t α c (s ⊙ G): the fused addcmul_ with ‖S‖ from per-channel norms
    equals forming S = G diag(s), limiting it and adding it, including a limited spike."""
    def build(cls):
        return lambda mats, bias: cls(
            [{"params": mats, "rank": 3, "update_proj_gap": 3, "scaling": scaling}, {"params": [bias]}],
            lr=1e-2, weight_decay=0.1,
        )

    assert_factored_equals_formed(build(lo.ApolloAdamW), build(FormedApollo), seed=5, norm_rtol=1e-5)


def test_state_is_two_low_rank_moments_per_matrix_and_no_basis():
    mats, bias = make_params()
    opt = lo.ApolloAdamW([{"params": mats, "rank": 3}, {"params": [bias]}])
    fake_grads([*mats, bias], 0)
    opt.step()
    fake_grads([*mats, bias], 1)
    opt.step()  # the limiter's norm exists from the first step on
    expected_total = bias.numel() * 4 * 2  # AdamW on the bias
    for p in mats:
        m, n = p.shape
        state = opt.state[p]
        long_side = max(m, n)
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {
            "exp_avg": (m, 3) if m >= n else (3, n), "exp_avg_sq": (m, 3) if m >= n else (3, n), "residual_norm": (),
        }
        assert not any(isinstance(v, torch.Tensor) for v in state["projector"].values())  # seeds, not a basis
        expected_total += 2 * 3 * long_side * 4 + 4  # two r x n moments and the limiter's norm, fp32
    assert memory.state_bytes(opt) == expected_total


def test_a_kept_basis_steps_identically_and_costs_exactly_the_basis():
    """projector_args={"keep": True}: the sketch drawn once per refresh instead of at every
    step; the same bases, so the same trajectory, for r x short-side floats more."""
    runs = []
    for keep in (False, True):
        mats, bias = make_params()
        opt = lo.ApolloAdamW([{"params": mats, "rank": 3, "update_proj_gap": 2, "projector_args": {"keep": keep}},
                              {"params": [bias]}], lr=1e-2)
        for step in range(5):  # refreshes at steps 0, 2 and 4
            fake_grads([*mats, bias], step)
            opt.step()
        runs.append((mats, opt))
    (plain, plain_opt), (kept, kept_opt) = runs
    for p, q in zip(plain, kept):
        assert torch.equal(p, q)
    basis_floats = sum(3 * min(p.shape) for p in kept)
    assert memory.state_bytes(kept_opt) == memory.state_bytes(plain_opt) + 4 * basis_floats
    projector = kept_opt._projector(0)
    assert sum(projector.state_bytes(tuple(p.shape), 4) for p in kept) == 4 * basis_floats  # as the estimator counts


def test_apollo_mini_preset():
    model = torch.nn.ModuleDict({"attn": torch.nn.Linear(16, 8), "mlp": torch.nn.Linear(8, 16)})
    opt = lo.create_optimizer("apollo_mini_adamw", model)
    group = opt.param_groups[0]
    assert (group["rank"], group["scaling"], group["scale"]) == (1, "tensor", math.sqrt(128))
    assert opt.param_groups[1].get("rank") is None  # biases stay dense


def test_channel_scaling_refuses_a_two_sided_sketch():
    with pytest.raises(ValueError, match=r"scaling='channel' cannot be combined with proj_type='full'"):
        lo.ApolloAdamW([{"params": make_params()[0], "rank": 2, "proj_type": "full"}])


def test_apollo_stream_needs_gaussian_draws():
    with pytest.raises(ValueError, match=r"stream='apollo'.*needs distribution='gaussian'"):
        lo.ApolloAdamW([{"params": make_params()[0], "rank": 2, "projector": "random",
                         "projector_args": {"stream": "apollo"}}])


@pytest.mark.parametrize("group", [
    {"projector": "svd"}, {"projector": "rsvd", "on_refresh": "reset"}, {"on_refresh": "project"}, {"projector": "dct"},
    {"projector": "columns", "rank": None, "density": 0.5},
], ids=["svd", "rsvd_reset", "project", "dct", "columns"])
def test_apollo_trains_on_every_kind_of_sketch(group):
    mats, bias = make_params()
    opt = lo.ApolloAdamW([{"params": mats, "rank": 3, "update_proj_gap": 3, **group}, {"params": [bias]}], lr=1e-2)
    start = [m.detach().clone() for m in mats]
    for t in range(7):
        fake_grads([*mats, bias], t)
        opt.step()
    assert all(torch.isfinite(m).all() and not torch.equal(m, s) for m, s in zip(mats, start))


@pytest.mark.parametrize("product", ["auto", "bfloat16"])
def test_layerwise_apollo_equals_a_regular_step(product):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"attn": torch.nn.Linear(12, 20), "head": torch.nn.Linear(20, 3)})
    twin = torch.nn.ModuleDict({"attn": torch.nn.Linear(12, 20), "head": torch.nn.Linear(20, 3)})
    twin.load_state_dict(model.state_dict())

    def build(m, **kw):
        groups = lo.param_groups(m, ("attn",), rank=4, update_proj_gap=3, projector_args={"product_dtype": product})
        return lo.ApolloAdamW(groups, lr=1e-2, **kw)

    opt, layerwise = build(model), build(twin, layerwise=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        x, y = torch.randn(8, 12, generator=gen), torch.randn(8, 3, generator=gen)
        for m, o in ((model, opt), (twin, layerwise)):
            torch.nn.functional.mse_loss(m["head"](torch.tanh(m["attn"](x))), y).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------- product precision
def sketch_of(rank, product_dtype, shape=(24, 48), keep=False):
    """A gaussian projector's state after its first refresh, and the projector."""
    projector = REGISTRY["gaussian"](rank, "std", 5, product_dtype=product_dtype, keep=keep)
    pstate = projector.init_state(torch.Size(shape), seed=3)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    projector.refresh(grad, pstate)
    return projector, pstate, grad


def test_bf16_sketch_multiplies_bf16_operands_and_returns_the_gradients_dtype():
    projector, pstate, grad = sketch_of(4, "bfloat16")
    basis, _ = projector.bases(pstate, grad.bfloat16())
    assert basis.dtype == torch.bfloat16
    low = projector.project(grad, pstate)
    assert low.dtype == torch.float32
    assert torch.equal(low, (basis.t() @ grad.bfloat16()).float())
    exact = REGISTRY["gaussian"](4, "std", 5, product_dtype="gradient").project(grad, pstate)
    assert not torch.equal(low, exact)  # rounded operands ...
    assert torch.allclose(low, exact, rtol=0.05, atol=0.05 * exact.abs().mean().item())  # ... of the same sketch


def test_auto_sketch_is_bf16_from_the_documented_rank_and_exact_below():
    for rank, bf16 in ((BF16_PRODUCT_MIN_RANK - 1, False), (BF16_PRODUCT_MIN_RANK, True)):
        auto, pstate, grad = sketch_of(rank, "auto")
        chosen = REGISTRY["gaussian"](rank, "std", 5, product_dtype="bfloat16" if bf16 else "gradient")
        assert torch.equal(auto.project(grad, pstate), chosen.project(grad, pstate))
        assert auto.product_dtype_for(rank, torch.float32) == (torch.bfloat16 if bf16 else torch.float32)
    assert auto.product_dtype_for(BF16_PRODUCT_MIN_RANK, torch.float16) == torch.float16  # never widened or swapped


def test_back_projection_uses_the_same_rounded_basis():
    """GaLore on a bf16 sketch: down and up use one basis (rounded to bf16), whatever the
    dtype the product runs in."""
    projector, pstate, grad = sketch_of(4, "bfloat16")
    fp32_basis, _ = projector.bases(pstate, grad)
    assert fp32_basis.dtype == torch.float32
    assert torch.equal(fp32_basis, fp32_basis.bfloat16().float())


def test_a_kept_bf16_sketch_is_stored_in_bf16_and_counted_so():
    mats = [torch.nn.Parameter(torch.randn(40, 24)), torch.nn.Parameter(torch.randn(20, 48))]
    runs = {}
    for keep in (False, True):
        params = [torch.nn.Parameter(p.detach().clone()) for p in mats]
        opt = lo.ApolloAdamW([{"params": params, "rank": 16, "update_proj_gap": 2, "projector_args": {"keep": keep}}], lr=1e-2)
        for step in range(5):  # refreshes at 0, 2, 4
            fake_grads(params, step)
            opt.step()
        runs[keep] = (params, opt)
    for p, q in zip(runs[False][0], runs[True][0]):
        assert torch.equal(p, q)  # drawn each step or kept: the same rounded basis
    params, opt = runs[True]
    projector = opt._projector(0)
    for p in params:
        kept = [t for t in opt.state[p]["projector"].values() if isinstance(t, torch.Tensor)]
        assert [t.dtype for t in kept] == [torch.bfloat16]
        assert projector.state_bytes(tuple(p.shape), 4) == kept[0].numel() * 2
    assert memory.state_bytes(opt) == memory.state_bytes(runs[False][1]) + sum(16 * min(p.shape) * 2 for p in params)


def test_apollo_at_rank_16_trains_as_well_with_the_bf16_sketch():
    ratios = {sketch: product_dtype_curve(lo.ApolloAdamW, sketch)[-1] for sketch in ("gradient", "auto")}
    assert ratios["gradient"] < 0.5  # it trains ...
    assert abs(ratios["auto"] - ratios["gradient"]) <= 0.1 * ratios["gradient"], ratios  # ... the same with bf16


def test_apollo_torch_stream_keeps_the_gradients_dtype_at_a_large_rank():
    """stream='apollo' (reference_compat's recipe) sketches in the gradient's dtype unless
    told otherwise, so it stays apollo_torch's arithmetic at ranks where 'auto' is bf16."""
    values = [torch.randn(40, 24), torch.randn(24, 48)]
    ours_params = [torch.nn.Parameter(v.clone()) for v in values]
    ref_params = [torch.nn.Parameter(v.clone()) for v in values]
    ref = apollo_torch.APOLLOAdamW([{"params": ref_params, "rank": 16, "update_proj_gap": 4, "scale": 1.0,
                                     "proj": "random", "proj_type": "std", "scale_type": "channel"}], lr=1e-2)
    ours = lo.ApolloAdamW([{"params": ours_params, "rank": 16, "update_proj_gap": 4, "projector_args": APOLLO_STREAM}],
                          lr=1e-2, weight_decay=0.0, **REFERENCE_RECIPE)
    ref.param_groups[0]["weight_decay"] = 0.0
    assert ours.param_groups[0]["projector_args"]["product_dtype"] == "gradient"
    assert_steps_like_apollo_torch(ours, ours_params, ref, ref_params, steps=10)


def test_a_checkpoint_from_before_the_bf16_sketch_resumes_with_its_fp32_sketch():
    mats, bias = make_params()
    opt = lo.ApolloAdamW([{"params": mats, "rank": 3}, {"params": [bias]}])
    assert opt.param_groups[0]["projector_args"] == {"product_dtype": "auto"}  # the default, recorded
    fake_grads([*mats, bias], 0)
    opt.step()
    saved = opt.state_dict()
    del saved["param_groups"][0]["projector_args"]["product_dtype"]  # as written before the option
    resumed = lo.ApolloAdamW([{"params": mats, "rank": 3}, {"params": [bias]}])
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["projector_args"]["product_dtype"] == "gradient"


def test_an_unknown_product_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match=r"ApolloAdamW.*product_dtype.*'float8'"):
        lo.ApolloAdamW([{"params": make_params()[0], "rank": 2, "projector_args": {"product_dtype": "float8"}}])


def test_a_kept_bf16_sketch_resumes_bit_for_bit_through_a_weights_only_checkpoint(tmp_path):
    values = [torch.randn(40, 24), torch.randn(20, 48)]

    def build(params):
        return lo.ApolloAdamW([{"params": params, "rank": 16, "update_proj_gap": 3, "projector_args": {"keep": True}}],
                              lr=1e-2)

    straight = [torch.nn.Parameter(v.clone()) for v in values]
    resumed = [torch.nn.Parameter(v.clone()) for v in values]
    opt = build(straight)
    first = build(resumed)
    for t in range(4):
        for params, o in ((straight, opt), (resumed, first)):
            fake_grads(params, t)
            o.step()
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    second = build(resumed)
    second.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert {t.dtype for s in second.state.values() for t in s["projector"].values() if isinstance(t, torch.Tensor)} == {torch.bfloat16}
    for t in range(4, 8):  # a refresh at step 6
        for params, o in ((straight, opt), (resumed, second)):
            fake_grads(params, t)
            o.step()
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
