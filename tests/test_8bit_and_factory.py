"""GaLoreAdamW8bit against bitsandbytes and our 32-bit GaLore; the factory helpers."""
from __future__ import annotations

import pytest
import torch

import lowrank_optim as lo

bnb = pytest.importorskip("bitsandbytes")


def test_dense_8bit_group_matches_bitsandbytes_adamw8bit():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 80))
    b = torch.nn.Parameter(a.detach().clone())
    ours = lo.GaLoreAdamW8bit([a], lr=1e-2, weight_decay=0.1, min_8bit_size=16)
    ref = bnb.optim.AdamW8bit([b], lr=1e-2, weight_decay=0.1, min_8bit_size=16)
    for step in range(6):
        g = torch.randn(64, 80, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.state[a]["exp_avg"].dtype == torch.uint8
    assert torch.equal(ours.state[a]["exp_avg"], ref.state[b]["state1"])


def test_projected_8bit_moments_track_32bit_galore():
    """8-bit moments on R: same trajectory as fp32 GaLore up to quantization error, 1/4 the bytes."""
    torch.manual_seed(0)
    init = torch.randn(96, 64)
    p8, p32 = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    groups = lambda p: [{"params": [p], "rank": 16, "update_proj_gap": 5, "scale": 1.0}]  # noqa: E731
    opt8 = lo.GaLoreAdamW8bit(groups(p8), lr=1e-2, min_8bit_size=16)
    opt32 = lo.GaLoreAdamW(groups(p32), lr=1e-2)
    for step in range(12):
        g = torch.randn(96, 64, generator=torch.Generator().manual_seed(step))
        p8.grad, p32.grad = g.clone(), g.clone()
        opt8.step()
        opt32.step()
    moved8, moved32 = p8 - init, p32 - init
    assert torch.nn.functional.cosine_similarity(moved8.flatten(), moved32.flatten(), dim=0) > 0.98
    s8, s32 = opt8.state[p8], opt32.state[p32]
    assert s8["exp_avg"].shape == s32["exp_avg"].shape == (96, 16)
    assert s8["exp_avg"].element_size() * 4 == s32["exp_avg"].element_size()


def test_param_groups_select_targets_and_keep_the_rest_dense():
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(10, 8),
            "self_attn": torch.nn.Linear(8, 8),
            "mlp": torch.nn.Linear(8, 16),
            "norm": torch.nn.LayerNorm(16),
        }
    )
    low, dense = lo.param_groups(model, ("attn", "mlp"), rank=4, update_proj_gap=50)
    assert low["param_names"] == ["self_attn.weight", "mlp.weight"]
    assert low["rank"] == 4 and low["update_proj_gap"] == 50
    assert set(dense["param_names"]) == {"embed.weight", "self_attn.bias", "mlp.bias", "norm.weight", "norm.bias"}
    opt = lo.GaLoreAdamW([low, dense])
    assert opt.param_groups[1]["rank"] is None


def test_create_optimizer_by_name_from_a_model():
    model = torch.nn.ModuleDict({"attn": torch.nn.Linear(8, 8), "head": torch.nn.Linear(8, 2)})
    opt = lo.create_optimizer("galore_adamw", model, rank=4, lr=0.02, scale=0.5)
    assert isinstance(opt, lo.GaLoreAdamW)
    assert [g["rank"] for g in opt.param_groups] == [4, None]
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["scale"] == 0.5
    dense = lo.create_optimizer("lowrank_galore_adafactor", model.parameters())
    assert all(g["rank"] is None for g in dense.param_groups)
    assert {"fira_adamw", "galore_adafactor", "galore_adamw", "galore_adamw8bit"} <= set(lo.available_optimizers())
    assert lo.available_optimizers() == sorted(lo.optim.OPTIMIZERS)


def test_param_groups_and_create_optimizer_take_int8_weights():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"attn": torch.nn.Linear(32, 16), "head": torch.nn.Linear(16, 2)})
    lo.convert_linear_to_int8(model, target_modules=("attn",), group_size=32)
    low, dense = lo.param_groups(model, ("attn",), rank=4)
    assert low["param_names"] == ["attn.weight"] and model["attn"].weight.dtype == torch.uint8
    opt = lo.create_optimizer("qgalore_adamw8bit", model, target_modules=("attn",), rank=4, lr=1e-2, min_8bit_size=16)
    codes = model["attn"].weight.detach().clone()
    x = torch.randn(8, 32)
    model["head"](torch.relu(model["attn"](x))).square().mean().backward()
    opt.step()
    assert model["attn"].weight.dtype == torch.uint8 and not torch.equal(model["attn"].weight, codes)
