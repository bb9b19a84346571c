"""Shared fixtures and the table of optimizer configurations the shared tests run over."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, torch.get_num_threads()))

import lowrank_optim as lo  # noqa: E402

# Odd, non-square shapes: both projection sides and both std branches get exercised.
SHAPES = [(24, 10), (9, 31)]


def make_params(dtype=torch.float32, seed=0):
    """Two projectable matrices and a bias-like vector (dense group)."""
    gen = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float32).to(dtype)) for s in SHAPES]
    bias = torch.nn.Parameter(torch.randn(7, generator=gen).to(dtype))
    return mats, bias


#: Shapes for comparisons against reference packages: odd, non-square, and one square
#: matrix (where the references' side rules are fragile).
REFERENCE_SHAPES = [(37, 20), (12, 29), (16, 16)]


def twin_params(seed=0):
    """Two identical sets (ours, the reference's) of three matrices and a bias."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(*s, generator=gen) for s in REFERENCE_SHAPES] + [torch.randn(5, generator=gen)]
    return [torch.nn.Parameter(v.clone()) for v in values], [torch.nn.Parameter(v.clone()) for v in values]


def groups(mats, bias, **low_rank):
    return [{"params": mats, "rank": 3, "update_proj_gap": 3, **low_rank}, {"params": [bias]}]


def fake_grads(params, step, seed=123):
    """Deterministic gradients with some low-rank structure, different at every step."""
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(seed + 1000 * step + i)
        g = torch.randn(p.shape, generator=gen)
        if p.dim() == 2:
            g = g + 3 * torch.outer(torch.randn(p.shape[0], generator=gen), torch.randn(p.shape[1], generator=gen))
        p.grad = g.to(device=p.device, dtype=p.dtype)


#: The tests that spawn two gloo processes.
needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def mse_losses(model, opt, x, y, steps: int) -> list[float]:
    """Full-batch training on mean squared error: the loss before each of ``steps`` steps."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def product_dtype_curve(cls, product_dtype: str, steps: int = 60) -> list[float]:
    """The loss curve (over the first loss) of ``cls`` with ``projector_args={"product_dtype":
    ...}`` on a small MLP fitting sin(sum x), full batch: its 32 x 48 first layer projected at
    rank 16 (where "auto" picks bf16), the rest dense; the same weights and data every call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 1))
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 32, generator=gen)
    y = torch.sin(x.sum(1, keepdim=True))
    others = [p for p in model.parameters() if p is not model[0].weight]
    opt = cls([{"params": [model[0].weight], "rank": 16, "update_proj_gap": 10,
                "projector_args": {"product_dtype": product_dtype}}, {"params": others}], lr=1e-2)
    losses = mse_losses(model, opt, x, y, steps)
    return [loss / losses[0] for loss in losses]


def assert_factored_equals_formed(build_factored, build_formed, seed: int, norm_rtol: float) -> None:
    """Train the optimizer whose update stays factored and its twin that forms the full-size
    direction for 8 steps, with a gradient spike at step 5 (the norm-growth limiter acts):
    the weights agree to rounding, and so do the limiter's norms."""
    runs = []
    for build in (build_factored, build_formed):
        mats, bias = make_params()
        opt = build(mats, bias)
        for t in range(8):
            fake_grads([*mats, bias], t, seed=seed)
            if t == 5:
                for p in mats:
                    p.grad.mul_(30)
            opt.step()
        runs.append((mats, opt))
    (ours, opt), (formed, formed_opt) = runs
    for p, q in zip(ours, formed):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["residual_norm"], formed_opt.state[q]["residual_norm"],
                                   rtol=norm_rtol, atol=0)


#: id -> builder(mats, bias) for every optimizer/projector configuration of the package.
OPTIMIZER_CASES = {
    "galore_svd": lambda m, b: lo.GaLoreAdamW(groups(m, b), lr=1e-2),
    "galore_rsvd": lambda m, b: lo.GaLoreAdamW(groups(m, b, projector="rsvd"), lr=1e-2),
    "galore_random_gauss": lambda m, b: lo.GaLoreAdamW(
        groups(m, b, projector="random", projector_args={"distribution": "gaussian"}), lr=1e-2
    ),
    "galore_random_orth": lambda m, b: lo.GaLoreAdamW(groups(m, b, projector="random"), lr=1e-2),
    "galore_full_project": lambda m, b: lo.GaLoreAdamW(groups(m, b, proj_type="full", on_refresh="project"), lr=1e-2),
    "galore_reset": lambda m, b: lo.GaLoreAdamW(groups(m, b, on_refresh="reset"), lr=1e-2, weight_decay=0.1),
    "galore_hf_style": lambda m, b: lo.GaLoreAdamW(
        groups(m, b), lr=1e-2, eps_style="hf", decay_after_update=True, weight_decay=0.1
    ),
    "galore_8bit": lambda m, b: lo.GaLoreAdamW8bit(groups(m, b), lr=1e-2, min_8bit_size=16),
    "galore_8bit_project": lambda m, b: lo.GaLoreAdamW8bit(
        groups(m, b, on_refresh="project"), lr=1e-2, min_8bit_size=16
    ),
    "galore_adafactor": lambda m, b: lo.GaLoreAdafactor(groups(m, b), beta1=0.9, weight_decay=0.01),
    "fira": lambda m, b: lo.FiraAdamW(groups(m, b), lr=1e-2, weight_decay=0.1),
    "fira_reference_matrix_project": lambda m, b: lo.FiraAdamW(
        groups(m, b, scaling="matrix", proj_type="full", on_refresh="project"),
        lr=1e-2, eps_style="hf", decay_after_update=True, reference_compat=True, norm_growth_limit=1.05,
    ),
    "frugal_svd": lambda m, b: lo.FrugalAdamW(groups(m, b), lr=1e-2, weight_decay=0.1),
    "frugal_blocks": lambda m, b: lo.FrugalAdamW(
        groups(m, b, rank=None, density=0.5, projector="blocks", projector_args={"order": "ascending"}), lr=1e-2
    ),
    "frugal_columns_keep": lambda m, b: lo.FrugalAdamW(
        groups(m, b, rank=None, density=0.5, projector="columns", on_refresh="keep"), lr=1e-2, state_free="sgd"
    ),
    "frugal_entries_project": lambda m, b: lo.FrugalAdamW(
        groups(m, b, rank=None, density=0.3, projector="entries", on_refresh="project"), lr=1e-2
    ),
    "dct_adamw": lambda m, b: lo.DCTAdamW(groups(m, b), lr=1e-2),
    "dct_adamw_full_matmul_l1": lambda m, b: lo.DCTAdamW(
        groups(m, b, proj_type="full", projector_args={"transform": "matmul", "norm": "l1"}), lr=1e-2, weight_decay=0.1
    ),
    "fira_dct": lambda m, b: lo.FiraAdamW(groups(m, b, projector="dct"), lr=1e-2),
    "frugal_dct": lambda m, b: lo.FrugalAdamW(groups(m, b, projector="dct", rank=None, density=0.3), lr=1e-2),
    "gradnorm_lorp": lambda m, b: lo.GradNormLoRPAdamW(groups(m, b), lr=1e-2, weight_decay=0.1),
    "gradnorm_lorp_8bit_project": lambda m, b: lo.GradNormLoRPAdamW8bit(
        groups(m, b, on_refresh="project"), lr=1e-2, min_8bit_size=16, weight_decay=0.1
    ),
    "gradnorm_lorp_hf_after_project": lambda m, b: lo.GradNormLoRPAdamW(
        groups(m, b, on_refresh="project"), lr=1e-2, eps_style="hf", decay_after_update=True, weight_decay=0.1
    ),
    "gradnorm_lorp_reset_full_rsvd": lambda m, b: lo.GradNormLoRPAdamW(
        groups(m, b, on_refresh="reset", proj_type="full", projector="rsvd"), lr=1e-2
    ),
    "natural_galore": lambda m, b: lo.NaturalGaLoreAdamW(groups(m, b), lr=1e-2, history=4, weight_decay=0.1),
    "natural_galore_full_clear": lambda m, b: lo.NaturalGaLoreAdamW(
        groups(m, b, proj_type="full", on_refresh="project"), lr=1e-2, history=2, damping=1e-2,
        history_on_refresh="clear",
    ),
    "qgalore": lambda m, b: lo.QGaLoreAdamW8bit(groups(m, b), lr=1e-2, min_8bit_size=16, weight_decay=0.1),
    "qgalore_rsvd_project_simulate": lambda m, b: lo.QGaLoreAdamW8bit(
        groups(m, b, on_refresh="project", projector_args={"inner": "rsvd", "group_size": 16, "queue_size": 2}),
        lr=1e-2, min_8bit_size=16, simulate=True, weight_group_size=32,
    ),
    "apollo": lambda m, b: lo.ApolloAdamW(groups(m, b), lr=1e-2, weight_decay=0.1),
    "apollo_mini_no_limiter": lambda m, b: lo.ApolloMiniAdamW(groups(m, b, rank=1), lr=1e-2, norm_growth_limit=None),
    "apollo_reference": lambda m, b: lo.ApolloAdamW(
        groups(m, b, projector_args={"stream": "apollo"}),
        lr=1e-2, eps=1e-6, eps_style="hf", decay_after_update=True, reference_compat=True, weight_decay=0.1,
    ),
    "galore_adafactor_project": lambda m, b: lo.GaLoreAdafactor(
        groups(m, b, on_refresh="project", proj_type="full"), lr=1e-2, relative_step=False
    ),
}


@pytest.fixture(params=sorted(OPTIMIZER_CASES))
def optimizer_case(request):
    return request.param, OPTIMIZER_CASES[request.param]


def state_tensors(opt):
    """Flatten an optimizer's state into {(param index, key path): value} for comparisons."""
    flat = {}
    ids = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(prefix + (k,), v)
        else:
            flat[prefix] = value

    for p, s in opt.state.items():
        walk((ids[id(p)],), s)
    return flat


def assert_same_state(a, b):
    fa, fb = state_tensors(a), state_tensors(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        va, vb = fa[key], fb[key]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype, key
            assert torch.equal(va, vb), key
        else:
            assert va == vb, key


class NoHostSync(TorchDispatchMode):
    """Fails on any device-to-host read of a tensor value: item(), float(), bool(), int(),
    Python max/comparisons on tensors all go through these two ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise AssertionError(f"host sync in the step: {func}")
        return func(*args, **(kwargs or {}))
