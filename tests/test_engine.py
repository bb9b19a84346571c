"""The step engine: projecting back straight into the weight, Fira's factored update, and
``torch.compile(optimizer.step)``."""
from __future__ import annotations

import pytest
import torch

import lowrank_optim as lo
from conftest import assert_factored_equals_formed, fake_grads, make_params
from lowrank_optim.projectors import REGISTRY

PROJECTORS = [
    ("svd", {}, "std"), ("svd", {}, "reverse_std"), ("svd", {}, "full"), ("rsvd", {}, "std"), ("random", {}, "std"),
    ("dct", {}, "std"), ("int4", {"group_size": 16}, "std"), ("columns", {}, "std"), ("rows", {}, "std"),
    ("entries", {}, "std"), ("blocks", {}, "std"),
]


@pytest.mark.parametrize("name,options,proj_type", PROJECTORS, ids=[f"{n}-{t}" for n, _, t in PROJECTORS])
@pytest.mark.parametrize("shape", [(24, 10), (9, 31)])
def test_add_back_is_beta_weight_plus_alpha_projected_back(name, options, proj_type, shape):
    """W <- beta W + alpha back(N), in place, for every projector (one product or a scatter)."""
    gen = torch.Generator().manual_seed(0)
    dense = name in ("svd", "rsvd", "random", "dct", "int4")
    projector = REGISTRY[name](None if name == "blocks" else (3 if dense else 4), proj_type, 10,
                               0.5 if name == "blocks" else None, **options)
    pstate = projector.init_state(torch.Size(shape), seed=1, group_slot=(0, 1))
    grad = torch.randn(*shape, generator=gen)
    projector.refresh(grad, pstate)
    low = torch.randn(projector.project(grad, pstate).shape, generator=gen)
    weight = torch.randn(*shape, generator=gen)
    expected = weight * 0.99 + (-0.3) * projector.project_back(low, pstate)
    projector.add_back(weight, low, pstate, alpha=-0.3, beta=0.99)
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6)


class MaterializingFira(lo.FiraAdamW):
    """Fira with the full-size residual formed, as before the factored update."""

    def materializes_direction(self, group, projector):
        return True


@pytest.mark.parametrize("scaling,proj_type", [("column", "std"), ("column", "reverse_std"), ("matrix", "full")])
def test_fira_factored_update_equals_the_formed_residual(scaling, proj_type):
    """P(αN − cφR) + αcφG (two products, no m x n residual) is the paper's α(PN + cS)."""
    def build(cls):
        return lambda mats, bias: cls(
            [{"params": mats, "rank": 3, "update_proj_gap": 3, "scaling": scaling, "proj_type": proj_type},
             {"params": [bias]}], lr=1e-2, weight_decay=0.1, norm_growth_limit=1.01,
        )

    assert_factored_equals_formed(build(lo.FiraAdamW), build(MaterializingFira), seed=7, norm_rtol=1e-4)


def test_torch_compile_of_the_step_trains_like_eager():
    """torch.compile(optimizer.step) (inductor on CPU) runs GaLoreAdamW across refreshes (where
    dynamo breaks the graph for the SVD and its finiteness check) and trains as eager does."""
    runs = []
    for compiled in (True, False):
        torch._dynamo.reset()
        mats, bias = make_params()
        opt = lo.GaLoreAdamW([{"params": mats, "rank": 3, "update_proj_gap": 3}, {"params": [bias]}],
                             lr=1e-2, weight_decay=0.1)
        step = torch.compile(opt.step) if compiled else opt.step
        for t in range(7):
            fake_grads([*mats, bias], t)
            step()
        runs.append([*mats, bias])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bulk_path_steps_large_groups_in_chunks(monkeypatch):
    """The bulk path's foreach temporaries live for a chunk, not the whole group: a group
    larger than BULK_CHUNK_ELEMENTS is stepped in several chunks, with the same result."""
    from lowrank_optim.optim import base, bulk

    chunks = []
    original = base.LowRankOptimizer._step_bucket
    monkeypatch.setattr(base.LowRankOptimizer, "_step_bucket",
                        lambda self, params, *a: (chunks.append(len(params)), original(self, params, *a))[1])
    monkeypatch.setattr(bulk, "BULK_CHUNK_ELEMENTS", 300)  # 24x10 = 240 and 9x31 = 279 entries
    mats, bias = make_params()
    opt = lo.GaLoreAdamW([{"params": mats, "rank": 3}, {"params": [bias]}], lr=1e-2)
    fake_grads([*mats, bias], 0)
    opt.step()
    assert chunks == [1, 1, 1]
    reference = make_params()
    single = lo.GaLoreAdamW([{"params": reference[0], "rank": 3}, {"params": [reference[1]]}], lr=1e-2, foreach=False)
    fake_grads([*reference[0], reference[1]], 0)
    single.step()
    for p, q in zip(mats, reference[0]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
