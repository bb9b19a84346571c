"""APOLLO and APOLLO-Mini: against apollo_torch (bit for bit), the factored update, state
size, presets and layer-wise mode.  The shared tests (resume, copies, dtypes, NaN, misuse,
bulk vs per-parameter) run them through conftest.OPTIMIZER_CASES."""
from __future__ import annotations

import math

import pytest
import torch

import lowrank_optim as lo
from conftest import assert_factored_equals_formed, fake_grads, make_params, twin_params
from lowrank_optim import memory

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
    for t in range(30):
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


def test_layerwise_apollo_equals_a_regular_step():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"attn": torch.nn.Linear(12, 20), "head": torch.nn.Linear(20, 3)})
    twin = torch.nn.ModuleDict({"attn": torch.nn.Linear(12, 20), "head": torch.nn.Linear(20, 3)})
    twin.load_state_dict(model.state_dict())
    build = lambda m, **kw: lo.ApolloAdamW(lo.param_groups(m, ("attn",), rank=4, update_proj_gap=3), lr=1e-2, **kw)  # noqa: E731
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
