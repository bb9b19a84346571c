"""The choice between the fused INT4 product and dequantize + matmul (kernels/int4.py).

Runs on CPU: the timer is a fake that reports set numbers (no test depends on a real
timing), and the CUDA kernel of the public ops (``int4.product``) is called directly on
CPU tensors, with the fused kernel's registration faked, so both of its paths and its
choice are exercised here; tests/test_cuda_int4.py runs it on a GPU.
"""
from __future__ import annotations

import pytest
import torch

import lowrank_optim.ops  # noqa: F401  (registers torch.ops.lowrank_optim)
from lowrank_optim.kernels import int4, reference
from lowrank_optim.kernels.int4 import Int4Basis, ProductChooser

OPS = torch.ops.lowrank_optim
CPU = torch.device("cpu")


class FakeTimer:
    """Reports ``seconds[path]`` for each timed call and counts the calls per path; a
    candidate is recognised by the ``path`` attribute the test puts on it."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.calls = seconds, {path: 0 for path in seconds}

    def __call__(self, fn, device):
        self.calls[fn.path] += 1
        return self.seconds[fn.path], fn()


def candidates(log: list[str]) -> dict:
    def make(path):
        def call():
            log.append(path)
            return torch.tensor(float(len(path)))  # which path produced a result

        call.path = path
        return call

    return {"fused": make("fused"), "dequantize": make("dequantize")}


def chooser(seconds, repeats=3, capturing=False):
    timer = FakeTimer(seconds)
    return ProductChooser(timer=timer, capturing=lambda: capturing, repeats=repeats), timer


@pytest.mark.parametrize("fast", ["fused", "dequantize"])
def test_the_faster_path_is_kept_and_timed_only_once(fast):
    slow = "dequantize" if fast == "fused" else "fused"
    select, timer = chooser({fast: 1e-3, slow: 2e-3})
    log: list[str] = []
    result = select.run(("key",), CPU, candidates(log))
    assert result.item() == len(fast)
    assert timer.calls == {"fused": 3, "dequantize": 3}
    decision = select.decisions[("key",)]
    assert decision.path == fast and decision.seconds == {fast: 1e-3, slow: 2e-3}
    log.clear()
    for _ in range(4):
        assert select.run(("key",), CPU, candidates(log)).item() == len(fast)
    assert log == [fast] * 4 and timer.calls == {"fused": 3, "dequantize": 3}  # no new measurement


def test_a_tie_keeps_the_fused_path():
    select, _ = chooser({"fused": 1e-3, "dequantize": 1e-3})
    select.run(("key",), CPU, candidates([]))
    assert select.decisions[("key",)].path == "fused"


def test_the_median_decides_not_one_outlier():
    samples = iter([5e-3, 1e-3, 1e-3, 2e-3, 2e-3, 2e-3])  # fused: one slow sample, median 1 ms

    select = ProductChooser(timer=lambda fn, device: (next(samples), fn()), capturing=lambda: False)
    select.run(("key",), CPU, candidates([]))
    assert select.decisions[("key",)].path == "fused"


def test_each_shape_class_is_measured_on_its_own():
    select, timer = chooser({"fused": 1e-3, "dequantize": 2e-3}, repeats=1)
    select.run(("a",), CPU, candidates([]))
    timer.seconds = {"fused": 3e-3, "dequantize": 2e-3}
    select.run(("b",), CPU, candidates([]))
    assert {k[0]: d.path for k, d in select.decisions.items()} == {"a": "fused", "b": "dequantize"}


def test_nothing_is_measured_while_a_cuda_graph_is_captured():
    select, timer = chooser({"fused": 2e-3, "dequantize": 1e-3}, capturing=True)
    log: list[str] = []
    select.run(("key",), CPU, candidates(log))
    assert log == ["fused"] and timer.calls == {"fused": 0, "dequantize": 0} and not select.decisions


def test_shape_classes_round_each_size_up_to_a_power_of_two():
    def key(m, n, rows, cols, left=True, back=False, dtype=torch.float32):
        stored = Int4Basis(torch.empty(0), torch.empty(0), torch.empty(0), rows, cols, 256, left)
        return int4.shape_class(torch.empty(m, n, dtype=dtype), stored, back)

    assert key(2048, 5461, 2048, 512) == key(2000, 5000, 2000, 512)
    assert key(2048, 5461, 2048, 512) != key(2048, 2048, 2048, 512)
    assert key(2048, 5461, 2048, 512) != key(2048, 5461, 2048, 512, dtype=torch.bfloat16)
    assert key(512, 5461, 2048, 512, back=True) != key(2048, 5461, 2048, 512)
    with pytest.raises(ValueError, match="does not match"):
        key(2047, 5461, 2048, 512)


# ---------------------------------------------------------------- the CUDA kernel, on CPU
def stored_basis(rows, cols, left, seed=0, group_size=64):
    gen = torch.Generator().manual_seed(seed)
    packed, scales, zeros = OPS.int4_quantize(torch.randn(rows, cols, generator=gen), group_size)
    return Int4Basis(packed, scales, zeros, rows, cols, group_size, left)


@pytest.fixture
def fused_registered(monkeypatch):
    """As on a GPU machine with the extension: a fused kernel exists."""
    monkeypatch.setattr(int4, "fused_kernel_registered", lambda back: True)
    monkeypatch.delenv(int4.PATH_ENV, raising=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("back", [False, True], ids=["project", "back"])
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("fast", ["fused", "dequantize"])
def test_either_path_gives_the_default_kernels_result(fused_registered, fast, left, back, dtype):
    m, n, r = 37, 23, 5
    basis = stored_basis(*((m, r) if left else (r, n)), left, seed=r)
    gen = torch.Generator().manual_seed(1)
    shape = int4.output_shape((m, n), basis, False) if back else (m, n)
    dense = torch.randn(shape, generator=gen).to(dtype)
    ran: list[str] = []
    slow = "dequantize" if fast == "fused" else "fused"

    def timer(fn, device):
        ran.append(fn.__name__)
        return {fast: 1e-3, slow: 2e-3}[fn.__name__], fn()

    select = ProductChooser(timer=timer, capturing=lambda: False, repeats=1)
    result = int4.product(dense, basis, back, chooser=select)
    expected = reference.int4_product(dense, basis, back)
    assert sorted(set(ran)) == ["dequantize", "fused"]
    assert next(iter(select.decisions.values())).path == fast
    assert result.dtype == dtype and result.shape == expected.shape
    # bf16: dequantize + matmul rounds the basis to bf16, the default kernel does not.
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(result, expected, **tol)


@pytest.mark.parametrize("path", ["fused", "dequantize"])
def test_the_environment_variable_forces_a_path_without_measuring(fused_registered, monkeypatch, path):
    monkeypatch.setenv(int4.PATH_ENV, path)
    called = []
    monkeypatch.setattr(int4, "dequantize_matmul", lambda *a: called.append("dequantize") or torch.zeros(5, 23))
    select = ProductChooser(timer=lambda fn, device: pytest.fail("measured a forced path"), capturing=lambda: False)
    basis = stored_basis(37, 5, True)
    out = int4.product(torch.randn(37, 23), basis, back=False, chooser=select)
    assert called == (["dequantize"] if path == "dequantize" else []) and out.shape == (5, 23)
    assert not select.decisions


def test_a_bad_environment_value_is_refused(monkeypatch):
    monkeypatch.setenv(int4.PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="LOWRANK_OPTIM_INT4_PATH must be auto, fused or dequantize, got 'fastest'"):
        int4.requested_path()


def test_without_a_fused_kernel_the_default_runs_unmeasured(monkeypatch):
    monkeypatch.delenv(int4.PATH_ENV, raising=False)
    monkeypatch.setattr(int4, "fused_kernel_registered", lambda back: False)
    select = ProductChooser(timer=lambda fn, device: pytest.fail("measured"), capturing=lambda: False)
    basis = stored_basis(37, 5, True)
    grad = torch.randn(37, 23)
    out = int4.product(grad, basis, back=False, chooser=select)
    assert torch.equal(out, reference.int4_product(grad, basis, back=False)) and not select.decisions


def test_cpu_tensors_never_reach_the_choice(monkeypatch):
    """The default path is unchanged: on CPU the ops run the default kernel directly."""
    monkeypatch.setattr(int4, "product", lambda *a, **k: pytest.fail("the CUDA kernel ran for CPU tensors"))
    basis = stored_basis(37, 5, True)
    grad = torch.randn(37, 23)
    assert torch.equal(OPS.int4_project(grad, *basis), reference.int4_product(grad, basis, back=False))
    low = torch.randn(5, 23)
    assert torch.equal(OPS.int4_project_back(low, *basis), reference.int4_product(low, basis, back=True))


def test_the_public_ops_have_a_cuda_kernel_and_the_fused_ones_only_with_an_extension():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("lowrank_optim::int4_project", "CUDA") and has("lowrank_optim::int4_project_back", "CUDA")
    from lowrank_optim.kernels.extension import extension_loaded

    assert has("lowrank_optim::int4_project_fused", "CUDA") == extension_loaded()
