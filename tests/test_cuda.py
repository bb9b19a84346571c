"""CUDA checks: skipped on machines without a GPU; run them on a GPU machine whenever one is available."""
from __future__ import annotations

import pytest
import torch

import lowrank_optim as lo
from conftest import OPTIMIZER_CASES, fake_grads, make_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CASES))
def test_cuda_run_tracks_the_cpu_run(name):
    """Same optimizer on CPU and CUDA: the trajectories agree to matmul rounding."""
    build = OPTIMIZER_CASES[name]
    runs = []
    for device in ("cpu", "cuda"):
        mats, bias = make_params()
        mats = [torch.nn.Parameter(m.detach().to(device)) for m in mats]
        bias = torch.nn.Parameter(bias.detach().to(device))
        opt = build(mats, bias)
        for t in range(7):
            fake_grads([*mats, bias], t)
            opt.step()
        runs.append([p.detach().cpu() for p in (*mats, bias)])
    for a, b in zip(*runs):
        if name.startswith(("galore_random", "frugal_columns", "frugal_entries")):  # CPU and CUDA generators differ
            assert torch.isfinite(b).all()
        else:
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_cuda_checkpoint_loads_onto_cpu():
    mats, bias = make_params()
    mats = [torch.nn.Parameter(m.detach().cuda()) for m in mats]
    bias = torch.nn.Parameter(bias.detach().cuda())
    opt = lo.GaLoreAdamW8bit([{"params": mats, "rank": 3}, {"params": [bias]}], min_8bit_size=16)
    fake_grads([*mats, bias], 0)
    opt.step()
    cpu_mats, cpu_bias = make_params()
    cpu_opt = lo.GaLoreAdamW8bit([{"params": cpu_mats, "rank": 3}, {"params": [cpu_bias]}], min_8bit_size=16)
    cpu_opt.load_state_dict(opt.state_dict())
    state = cpu_opt.state[cpu_mats[0]]
    assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].dtype == torch.uint8
    assert state["exp_avg_absmax"].dtype == torch.float32
