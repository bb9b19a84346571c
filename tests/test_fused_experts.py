"""Projected weights beyond nn.Linear: fused expert stacks (E x m x n, each matrix projected on
its own) and GPT-2's Conv1D; and the one-line summary of what was projected."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import lowrank_optim as lo
from lowrank_optim.factory import projection_summary

E, M, N = 3, 12, 8


class TinyExperts(nn.Module):
    """Named like transformers' fused-experts modules (MixtralExperts): one 3-D weight."""

    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.randn(E, M, N) * 0.3)

    def forward(self, x):  # every expert sees the batch: (E, B, N) -> (E, B, M)
        return torch.tanh(torch.einsum("bn,emn->ebm", x, self.up))


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Module()
        self.mlp.experts = TinyExperts()
        self.head = nn.Linear(M, 2)

    def forward(self, x):
        return self.head(self.mlp.experts(x)).sum(0)


def batches(steps=6):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, N, generator=gen), torch.randn(5, 2, generator=gen)) for _ in range(steps)]


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def separate_twin(model):
    """The same model with the stack split into E ordinary matrices."""
    mats = [nn.Parameter(model.mlp.experts.up.detach()[e].clone()) for e in range(E)]
    head = nn.Linear(M, 2)
    head.load_state_dict(model.head.state_dict())

    def forward(x):
        hidden = torch.stack([torch.tanh(x @ w.t()) for w in mats])
        return head(hidden).sum(0)

    return mats, head, forward


@pytest.mark.parametrize("cls", [lo.GaLoreAdamW, lo.FiraAdamW])
def test_a_stack_steps_like_its_matrices_as_separate_parameters(cls):
    model = MoE()
    mats, head, forward = separate_twin(model)
    # The exact SVD: a randomized sketch is drawn from each matrix's own seed, which differs
    # between a stack's matrices and separate parameters.
    stacked = cls([{"params": [model.mlp.experts.up], "rank": 2, "update_proj_gap": 2},
                   {"params": list(model.head.parameters())}], lr=1e-2, projector="svd")
    separate = cls([{"params": mats, "rank": 2, "update_proj_gap": 2}, {"params": list(head.parameters())}],
                   lr=1e-2, foreach=False, projector="svd")
    for x, y in batches():
        loss_of(model, x, y).backward()
        nn.functional.mse_loss(forward(x), y).backward()
        for opt in (stacked, separate):
            opt.step()
            opt.zero_grad()
    for e in range(E):
        torch.testing.assert_close(model.mlp.experts.up[e], mats[e], rtol=0, atol=1e-6)
    state = stacked.state[model.mlp.experts.up]
    assert len(state["matrices"]) == E and state["matrices"][0]["exp_avg"].shape == (M, 2)
    assert state["matrices"][0]["projector"]["refreshes"] == 3  # steps 0, 2, 4
    assert not torch.allclose(model.mlp.experts.up, MoE().mlp.experts.up)  # it trained


def test_each_matrix_of_a_stack_draws_its_own_random_basis():
    model = MoE()
    opt = lo.GaLoreAdamW([{"params": [model.mlp.experts.up], "rank": 2, "projector": "random"}], lr=1e-2)
    loss_of(model, *batches(1)[0]).backward()
    opt.step()
    matrices = opt.state[model.mlp.experts.up]["matrices"]
    seeds = {sub["projector"]["seed"] for sub in matrices}
    assert len(seeds) == E


def test_a_stack_resumes_exactly_and_a_mismatched_checkpoint_is_refused():
    def build(model, **kw):
        return lo.GaLoreAdamW([{"params": [model.mlp.experts.up], "rank": 2, "update_proj_gap": 2},
                               {"params": list(model.head.parameters())}], lr=1e-2, **kw)

    data = batches(6)
    model, twin = MoE(), MoE()
    opt, layerwise = build(model), build(twin, layerwise=True)
    for x, y in data[:3]:
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        loss_of(twin, x, y).backward()  # layer-wise: stepped inside backward
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = MoE()
    resumed.load_state_dict(saved["model"])
    resumed_opt = build(resumed)
    resumed_opt.load_state_dict(saved["opt"])
    for x, y in data[3:]:
        for m, o in ((model, opt), (resumed, resumed_opt)):
            loss_of(m, x, y).backward()
            o.step()
            o.zero_grad()
        loss_of(twin, x, y).backward()
    assert torch.equal(model.mlp.experts.up, resumed.mlp.experts.up)
    torch.testing.assert_close(twin.mlp.experts.up, model.mlp.experts.up, rtol=0, atol=1e-6)

    dense = lo.GaLoreAdamW([{"params": [MoE().mlp.experts.up]}, {"params": list(MoE().head.parameters())}])
    with pytest.raises(ValueError, match="param group 0 of the checkpoint has rank=2, this optimizer was built with"):
        dense.load_state_dict(saved["opt"])
    flat = lo.GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(M, N))], "rank": 2},
                           {"params": list(MoE().head.parameters())}])
    with pytest.raises(ValueError, match="one state per matrix of a stack, but the parameter is not a projected stack"):
        flat.load_state_dict(saved["opt"])
    wider = lo.GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(E + 1, M, N))], "rank": 2},
                            {"params": list(MoE().head.parameters())}])
    with pytest.raises(ValueError, match=f"the state of {E} matrices, the stack has {E + 1}"):
        wider.load_state_dict(saved["opt"])


def test_a_stack_too_narrow_for_the_rank_is_refused_per_matrix():
    with pytest.raises(ValueError, match=r"each of its matrices: rank=9 is larger than the 12x8 matrix"):
        lo.GaLoreAdamW([{"params": [MoE().mlp.experts.up], "rank": 9}])


def test_factory_projects_expert_stacks_and_conv1d_and_says_what_it_projected(capsys):
    model = MoE()
    groups = lo.param_groups(model, ("mlp",), rank=2)
    assert groups[0]["param_names"] == ["mlp.experts.up"]
    total = E * M * N + M * 2 + 2
    assert projection_summary(groups) == (
        f"lowrank_optim: projecting {E} matrices ({100 * E * M * N / total:.1f}% of {total:,} parameters) at rank 2; "
        "the rest is dense"
    )
    lo.create_optimizer("galore_adamw", MoE(), target_modules=("head",), rank=1)
    lo.create_optimizer("galore_adamw", MoE(), target_modules=("head",), rank=1)  # printed once
    out = capsys.readouterr().out.splitlines()
    assert out == [f"lowrank_optim: projecting 1 matrices ({100 * M * 2 / total:.1f}% of {total:,} parameters) at "
                   f"rank 1; the rest is dense; 1 tensors of 3+ dimensions ({100 * E * M * N / total:.1f}%, e.g. "
                   "fused experts) stay dense"]

    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0))
    names = lo.param_groups(gpt2, ("attn", "mlp"), rank=2)[0]["param_names"]
    assert names == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                     "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]


@pytest.mark.parametrize("name", lo.available_optimizers())
def test_every_optimizer_steps_a_stack_resumes_it_in_bf16_and_skips_a_nan_refresh(name):
    """The paths after the happy one, for a stack: hooks that look a parameter up (its name,
    position, seed) get one matrix of it; a checkpoint resumes into a bf16 model; a NaN
    gradient at a refresh leaves the weights as they were."""
    import warnings

    cls = lo.optim.OPTIMIZERS[name]
    kw = {"min_8bit_size": 16} if "8bit" in name else {}
    if name != "galore_adafactor":
        kw["lr"] = 1e-2
    size = {"density": 0.5} if name == "frugal_adamw" else {"rank": 2}
    torch.manual_seed(0)
    stack = nn.Parameter(torch.randn(E, M, N) * 0.3)
    opt = cls([{"params": [stack], "update_proj_gap": 2, **size}], **kw)
    for _ in range(4):  # refreshes at steps 0 and 2
        stack.grad = torch.randn_like(stack)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    half = nn.Parameter(stack.detach().to(torch.bfloat16))
    resumed = cls([{"params": [half], "update_proj_gap": 2, **size}], **kw)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    half.grad = torch.randn_like(half)
    resumed.step()
    assert torch.isfinite(half).all() and not torch.equal(half, stack.detach().to(torch.bfloat16))
    before = stack.detach().clone()
    stack.grad = torch.full_like(stack, float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()  # step 4 refreshes: skipped, basis and weights kept
    assert torch.equal(stack, before)
    assert any("refresh skipped" in str(w.message) for w in caught)
