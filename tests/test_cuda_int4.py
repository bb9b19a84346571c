"""CUDA kernels of the INT4 ops (csrc/int4.cu) against the default kernels.

Skipped without a GPU, and without a built extension (``LOWRANK_OPTIM_BUILD_EXT=1 pip
install -e .`` or ``lowrank_optim.kernels.extension.build_jit()``): without it both sides
would run the same default kernel and the comparison would prove nothing.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_optim.ops  # noqa: F401  (registers the ops and loads the extension)
from lowrank_optim.kernels import reference
from lowrank_optim.kernels.extension import DISABLE_ENV, extension_loaded
from lowrank_optim.kernels.int4 import Int4Basis

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not extension_loaded(), reason="needs the built extension lowrank_optim._C"),
]
OPS = torch.ops.lowrank_optim
SIZES = [1, 2, 17, 255, 256, 257, 4097]
GROUP_SIZES = [256, 64, 7]  # 7: odd, so a byte's two codes can belong to two groups
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _values(numel, kind, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen)
    if kind == "constant":  # every group all-equal: the range is [0, c] or [c, 0]
        x = torch.full((numel,), -0.37)
    elif kind == "zeros":  # the minimum range 1e-5 decides the scale
        x = torch.zeros(numel)
    elif kind == "positive":  # one-signed groups: the zero point sits at 0
        x = x.abs() + 1.0
    elif kind == "ties":  # exact .5 multiples of the step test round-half-to-even
        x = torch.arange(numel, dtype=torch.float32) % 16 - 7.5
    return x.to(dtype).cuda()


@pytest.mark.parametrize("numel", SIZES)
def test_pack_and_unpack_match_the_default(numel):
    codes = torch.randint(0, 16, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.uint8).cuda()
    packed = OPS.int4_pack(codes)
    assert torch.equal(packed, reference.int4_pack(codes))
    assert torch.equal(OPS.int4_unpack(packed, numel), reference.int4_unpack(packed, numel))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "constant", "zeros", "positive", "ties"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("numel", SIZES)
def test_quantize_and_dequantize_are_bit_identical_to_the_default(numel, group_size, kind, dtype):
    x = _values(numel, kind, dtype, seed=numel + group_size)
    ours = OPS.int4_quantize(x, group_size)
    theirs = reference.int4_quantize(x, group_size)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for out_dtype in DTYPES:
        assert torch.equal(
            OPS.int4_dequantize(*ours, numel, group_size, out_dtype),
            reference.int4_dequantize(*theirs, numel, group_size, out_dtype),
        )


def _stored_basis(rows, cols, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rows, cols, generator=gen)
    basis[: max(rows // 3, 1)] = basis[: max(rows // 3, 1)].abs()  # one-signed groups
    packed, scales, zeros = reference.int4_quantize(basis.cuda(), group_size)
    return packed, scales, zeros, rows, cols, group_size


# (m, n, r): tile edges (64) and one past them, odd sizes, a rank above the tile.
PROJECTION_SHAPES = [(1, 1, 1), (17, 5, 3), (65, 129, 7), (257, 17, 64), (130, 300, 65)]


# The fused kernel itself, and the public op, which runs it or dequantize + cuBLAS.
PRODUCTS = {"fused": ("int4_project_fused", "int4_project_back_fused"), "public": ("int4_project", "int4_project_back")}


@pytest.mark.parametrize("ops", sorted(PRODUCTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [256, 7])
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("m, n, r", PROJECTION_SHAPES)
def test_fused_projection_matches_the_default(m, n, r, left, group_size, dtype, ops):
    project, project_back = (getattr(OPS, name) for name in PRODUCTS[ops])
    basis = Int4Basis(*_stored_basis(*((m, r) if left else (r, n)), group_size, seed=m + n + r), left)
    gen = torch.Generator().manual_seed(m * n)
    grad = torch.randn(m, n, generator=gen).to(dtype).cuda()
    low = project(grad, *basis)
    expected = reference.int4_product(grad, basis, back=False)
    # Both accumulate in fp32; only the summation order differs (then one output rounding).
    # The public op may take dequantize + matmul in bf16/fp16, which rounds the basis too.
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert low.dtype == dtype and low.shape == expected.shape
    torch.testing.assert_close(low, expected, **tol)
    coords = torch.randn(expected.shape, generator=gen).to(dtype).cuda()
    full = project_back(coords, *basis)
    torch.testing.assert_close(full, reference.int4_product(coords, basis, back=True), **tol)


def test_the_public_op_records_a_measured_choice_per_shape_class(monkeypatch):
    """On the first call of a shape class both paths are timed and the faster one is kept."""
    from lowrank_optim.kernels import int4

    monkeypatch.delenv(int4.PATH_ENV, raising=False)
    monkeypatch.setattr(int4, "CHOOSER", int4.ProductChooser())
    basis = Int4Basis(*_stored_basis(256, 32, 256, seed=11), True)
    grad = torch.randn(256, 512, device="cuda")
    OPS.int4_project(grad, *basis)
    (decision,) = int4.CHOOSER.decisions.values()
    assert decision.path in int4.PATHS and set(decision.seconds) == set(int4.PATHS)
    assert all(seconds > 0 for seconds in decision.seconds.values())


def test_fused_projection_of_a_non_contiguous_fp64_gradient():
    """Other dtypes run in fp32 and come back in theirs, as the default kernel does."""
    stored = _stored_basis(33, 6, 64, seed=5)
    grad = torch.randn(40, 33, dtype=torch.float64).cuda().t()
    low = OPS.int4_project_fused(grad, *stored, True)
    assert low.dtype == torch.float64
    torch.testing.assert_close(low, reference.int4_product(grad, Int4Basis(*stored, True), False), rtol=1e-5, atol=1e-5)


def test_mismatched_shapes_raise_value_errors():
    stored = _stored_basis(17, 5, 64, seed=6)
    for op in (OPS.int4_project, OPS.int4_project_fused):
        with pytest.raises(ValueError, match="does not match"):
            op(torch.randn(16, 4, device="cuda"), *stored, True)


def _cuda_op_cases():
    x = torch.randn(5, 77, device="cuda")
    packed, scales, zeros = OPS.int4_quantize(x, 64)
    stored = _stored_basis(17, 5, 64, seed=7)
    return {
        "int4_pack": ("int4_pack", (torch.randint(0, 16, (17,), dtype=torch.uint8, device="cuda"),)),
        "int4_unpack": ("int4_unpack", (packed, x.numel())),
        "int4_quantize": ("int4_quantize", (x, 64)),
        "int4_dequantize": ("int4_dequantize", (packed, scales, zeros, x.numel(), 64, torch.bfloat16)),
        "int4_project": ("int4_project", (torch.randn(17, 9, device="cuda"), *stored, True)),
        "int4_project_back": ("int4_project_back", (torch.randn(4, 17, device="cuda"), *stored, False)),
        "int4_project_fused": ("int4_project_fused", (torch.randn(17, 9, device="cuda"), *stored, True)),
        "int4_project_back_fused": ("int4_project_back_fused", (torch.randn(4, 17, device="cuda"), *stored, False)),
    }


CUDA_OPS = ["int4_pack", "int4_unpack", "int4_quantize", "int4_dequantize", "int4_project", "int4_project_back",
            "int4_project_fused", "int4_project_back_fused"]


@pytest.mark.parametrize("case", CUDA_OPS)  # the cases need a GPU: built in the test, not at collection
def test_opcheck_on_cuda(case):
    name, args = _cuda_op_cases()[case]
    torch.library.opcheck(getattr(OPS, name), args)


_QGALORE_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
import lowrank_optim as lo
from lowrank_optim.kernels.extension import extension_loaded
from conftest import fake_grads, make_params
assert extension_loaded() == {expect_loaded}
mats, bias = make_params()
mats = [torch.nn.Parameter(m.detach().cuda()) for m in mats]
bias = torch.nn.Parameter(bias.detach().cuda())
opt = lo.QGaLoreAdamW8bit([{{"params": mats, "rank": 3, "update_proj_gap": 2}}, {{"params": [bias]}}],
                          lr=1e-2, min_8bit_size=16)
for t in range(7):
    fake_grads([*mats, bias], t)
    opt.step()
torch.save([p.detach().cpu() for p in (*mats, bias)], {out!r})
"""


def test_qgalore_with_and_without_the_extension_agree(tmp_path):
    """The same run in two processes, one with LOWRANK_OPTIM_DISABLE_EXT=1."""
    results = []
    for disabled in (False, True):
        out = tmp_path / f"disabled_{disabled}.pt"
        env = dict(os.environ)
        env.pop(DISABLE_ENV, None)
        if disabled:
            env[DISABLE_ENV] = "1"
        code = _QGALORE_RUN.format(tests=str(Path(__file__).parent), expect_loaded=not disabled, out=str(out))
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        results.append(torch.load(out))
    for with_ext, without in zip(*results):
        torch.testing.assert_close(with_ext, without, rtol=2e-3, atol=2e-3)
