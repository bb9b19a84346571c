"""INT4 projection ops (default kernels against a direct computation, opcheck), the
extension loader, and the Triton kernel under the interpreter."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lowrank_optim.ops  # noqa: F401  (registers torch.ops.lowrank_optim)
from lowrank_optim.kernels import extension
from lowrank_optim.kernels.int4 import Int4Basis
from lowrank_optim.quant import dequantize_int4, quantize_int4

OPS = torch.ops.lowrank_optim
# (m, n, r): ones, primes that cut the 64-element groups mid-row, and 257 (a group boundary
# plus one).  Group size 64 over a 17 x 5 basis: groups span rows.
SHAPES = [(1, 1, 1), (17, 5, 3), (5, 17, 1), (257, 17, 5), (17, 257, 4)]
GROUP_SIZE = 64


def _basis(rows, cols, seed):
    """An INT4-stored random basis and its dequantized fp32 matrix (the existing reference)."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=gen)
    dense[: max(rows // 3, 1)] += 2.0  # one-signed groups
    stored = quantize_int4(dense, GROUP_SIZE)
    exact = dequantize_int4(stored["codes"], stored["scales"], stored["zeros"], (rows, cols), GROUP_SIZE)
    return (stored["codes"], stored["scales"], stored["zeros"], rows, cols, GROUP_SIZE), exact


def _tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("m, n, r", SHAPES)
def test_project_and_back_match_dequantize_then_matmul(m, n, r, left, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    grad = torch.randn(m, n, generator=gen).to(dtype)
    stored, basis = _basis(*((m, r) if left else (r, n)), seed=r)
    low = OPS.int4_project(grad, *stored, left)
    expected_low = basis.t() @ grad.float() if left else grad.float() @ basis.t()
    assert low.dtype == dtype and low.shape == expected_low.shape
    torch.testing.assert_close(low.float(), expected_low, **_tolerance(dtype))

    coords = torch.randn(expected_low.shape, generator=gen).to(dtype)
    full = OPS.int4_project_back(coords, *stored, left)
    expected_full = basis @ coords.float() if left else coords.float() @ basis
    assert full.dtype == dtype and full.shape == grad.shape
    torch.testing.assert_close(full.float(), expected_full, **_tolerance(dtype))


def test_project_is_not_the_dense_product_with_the_unquantized_basis():
    """The op must read the stored codes: INT4 error shows against the fp32 basis."""
    gen = torch.Generator().manual_seed(0)
    dense = torch.linalg.qr(torch.randn(64, 8, generator=gen))[0]
    grad = torch.randn(64, 32, generator=gen)
    stored = quantize_int4(dense, GROUP_SIZE)
    low = OPS.int4_project(grad, stored["codes"], stored["scales"], stored["zeros"], 64, 8, GROUP_SIZE, True)
    assert not torch.allclose(low, dense.t() @ grad, atol=1e-4)
    torch.testing.assert_close(low, dense.t() @ grad, rtol=0.2, atol=0.2 * grad.abs().max().item())


def _op_cases():
    stored, _ = _basis(17, 5, seed=1)
    grad = torch.randn(17, 9, generator=torch.Generator().manual_seed(2))
    return {
        "int4_project_left": ("int4_project", (grad, *stored, True)),
        "int4_project_right": ("int4_project", (grad[:, :5].t().contiguous(), *_basis(5, 17, seed=3)[0], False)),
        "int4_project_back_left": ("int4_project_back", (torch.randn(5, 9), *stored, True)),
        "int4_project_back_right_bf16": (
            "int4_project_back",
            (torch.randn(4, 5).bfloat16(), *_basis(5, 17, seed=3)[0], False),
        ),
        "int4_project_fused_left": ("int4_project_fused", (grad, *stored, True)),
        "int4_project_back_fused_right": ("int4_project_back_fused", (torch.randn(4, 5), *_basis(5, 17, seed=3)[0], False)),
    }


@pytest.mark.parametrize("case", sorted(_op_cases()))
def test_opcheck(case):
    name, args = _op_cases()[case]
    torch.library.opcheck(getattr(OPS, name), args)


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_projector_multiplies_straight_from_the_codes(proj_type, dtype, monkeypatch):
    """Q-GaLore's projector calls the INT4 projection ops, never a dense basis, and gets
    what dequantize-then-matmul in fp32 gives."""
    from lowrank_optim.projectors.quantized import QuantizedProjector

    projector = QuantizedProjector(3, proj_type, group_size=GROUP_SIZE)
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(19, 11, generator=gen).to(dtype)
    pstate = projector.init_state(grad.shape, seed=0)
    projector.refresh(grad, pstate)
    left, right = (b.float() if b is not None else None for b in projector.bases(pstate, grad.float()))
    monkeypatch.setattr(QuantizedProjector, "bases", lambda *a: pytest.fail("project used a dense basis"))
    low = projector.project(grad, pstate)
    expected = grad.float()
    expected = left.t() @ expected if left is not None else expected
    expected = expected @ right.t() if right is not None else expected
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), expected, **_tolerance(dtype))
    full = projector.project_back(low, pstate)
    expected_full = low.float()
    expected_full = left @ expected_full if left is not None else expected_full
    expected_full = expected_full @ right if right is not None else expected_full
    assert full.shape == grad.shape
    torch.testing.assert_close(full.float(), expected_full, **_tolerance(dtype))


# ---------------------------------------------------------------------------- loader
@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as if the process had not tried yet; restored afterwards."""
    monkeypatch.setitem(extension._state, "attempted", False)
    monkeypatch.setitem(extension._state, "loaded", False)
    return extension


def test_no_extension_on_a_cpu_machine_is_silent(fresh_loader, monkeypatch):
    monkeypatch.setattr(fresh_loader, "_library_path", lambda: None)
    monkeypatch.setattr(fresh_loader, "_cuda_machine", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh_loader.load_extension() is False
    assert not fresh_loader.extension_loaded()


def test_missing_extension_on_a_cuda_machine_warns_once(fresh_loader, monkeypatch):
    monkeypatch.setattr(fresh_loader, "_library_path", lambda: None)
    monkeypatch.setattr(fresh_loader, "_cuda_machine", lambda: True)
    with pytest.warns(RuntimeWarning, match="not built.*build_jit") as record:
        fresh_loader.load_extension()
        fresh_loader.load_extension()
    assert len(record) == 1


def test_failing_load_warns_once_and_the_ops_still_run(fresh_loader, monkeypatch):
    def broken(path):
        raise OSError(f"{path}: undefined symbol: _ZN3c10")

    monkeypatch.setattr(fresh_loader, "_library_path", lambda: "/nowhere/_C.so")
    monkeypatch.setattr(fresh_loader, "_load_library", broken)
    with pytest.warns(RuntimeWarning, match="failed to load.*undefined symbol") as record:
        assert fresh_loader.load_extension() is False
        assert fresh_loader.load_extension() is False
    assert len(record) == 1 and not fresh_loader.extension_loaded()
    stored, basis = _basis(17, 5, seed=4)
    grad = torch.randn(17, 3)
    torch.testing.assert_close(OPS.int4_project(grad, *stored, True), basis.t() @ grad)


def test_disable_env_var_skips_the_load(fresh_loader, monkeypatch):
    monkeypatch.setenv(extension.DISABLE_ENV, "1")
    monkeypatch.setattr(fresh_loader, "_library_path", lambda: pytest.fail("the disabled loader looked for a library"))
    assert fresh_loader.load_extension() is False


def test_successful_load_is_recorded_and_idempotent(fresh_loader, monkeypatch):
    loads = []
    monkeypatch.setattr(fresh_loader, "_library_path", lambda: "/built/_C.so")
    monkeypatch.setattr(fresh_loader, "_load_library", loads.append)
    assert fresh_loader.load_extension() and fresh_loader.load_extension()
    assert loads == ["/built/_C.so"] and fresh_loader.extension_loaded()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only import")
def test_import_on_this_cpu_machine_loads_nothing_and_warns_nothing():
    code = (
        "import warnings; warnings.simplefilter('error', RuntimeWarning);"
        "import lowrank_optim.ops; from lowrank_optim.kernels.extension import extension_loaded;"
        "assert not extension_loaded()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_sources_are_translation_units_only():
    sources = extension.cuda_sources(extension.CSRC)
    assert any(s.endswith("int4.cu") for s in sources) and any(s.endswith("int4_ops.cpp") for s in sources)
    assert all(s.endswith((".cu", ".cpp")) for s in sources)


# ---------------------------------------------------------------------------- Triton
# triton reads TRITON_INTERPRET when it is imported (its standard library is jitted then),
# and other test modules import it early (bitsandbytes does), so the interpreted tests run
# in a fresh process that sets the variable first: the tests below named *interpreted* are
# skipped in the main run and run by test_triton_kernels_under_the_interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def triton_int4():
    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess of test_triton_kernels_under_the_interpreter")
    pytest.importorskip("triton")
    from lowrank_optim.kernels import triton_int4

    return triton_int4


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.skipif(INTERPRETED, reason="this is the interpreted run")
def test_triton_kernels_under_the_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "interpreted"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and "passed" in summary and "skipped" not in summary, result.stdout[-4000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("m, n, r", [(1, 1, 1), (17, 5, 3), (70, 33, 5)])
def test_interpreted_triton_kernel_matches_the_default(triton_int4, m, n, r, left, dtype):
    gen = torch.Generator().manual_seed(m + n)
    stored, _ = _basis(*((m, r) if left else (r, n)), seed=r + 7)
    # A transposed gradient: the kernel reads strides, no copy.
    grad = torch.randn(n, m, generator=gen).to(dtype).t()
    basis = Int4Basis(*stored, left)
    low = triton_int4.product(grad, basis, back=False)
    expected = OPS.int4_project(grad, *basis)
    assert low.dtype == dtype and low.shape == expected.shape
    torch.testing.assert_close(low, expected, **_tolerance(dtype))
    coords = torch.randn(expected.shape, generator=gen).to(dtype)
    torch.testing.assert_close(
        triton_int4.product(coords, basis, back=True),
        OPS.int4_project_back(coords, *basis),
        **_tolerance(dtype),
    )


def test_interpreted_triton_kernel_rejects_a_mismatched_basis(triton_int4):
    stored, _ = _basis(17, 5, seed=8)
    with pytest.raises(ValueError, match="does not match the 17x5 basis"):
        triton_int4.product(torch.randn(16, 4), Int4Basis(*stored, True), back=False)
