"""Q-GaLore: INT4 ops and basis, lazy refresh, INT8 weights with stochastic rounding."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import _distributed_worker as distributed_worker
import _int8_ddp_worker as int8_ddp
import lowrank_optim.ops  # noqa: F401  (registers torch.ops.lowrank_optim)
from conftest import assert_same_state, needs_gloo
from lowrank_optim.optim.qgalore import QGaLoreAdamW8bit
from lowrank_optim.projectors.quantized import QuantizedProjector
from lowrank_optim.quant import (
    Int8Linear,
    clip_grad_norm_,
    convert_linear_to_int8,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    stochastic_round_generator,
    sync_int8_grads,
    unpack_int4,
)
from lowrank_optim.quant.int8_linear import SYNCED

ODD_SIZES = [1, 2, 17, 255, 256, 257, 513, 4097]


# ---------------------------------------------------------------------------- INT4 ops
@pytest.mark.parametrize("numel", ODD_SIZES)
def test_int4_pack_unpack_round_trip_is_exact(numel):
    codes = torch.randint(0, 16, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_int4(packed, numel), codes)


def test_int4_packing_layout_low_nibble_first():
    assert pack_int4(torch.tensor([3, 10, 15], dtype=torch.uint8)).tolist() == [3 | 10 << 4, 15]


@pytest.mark.parametrize("group_size", [256, 64, 7])
@pytest.mark.parametrize("shape", [(1,), (17,), (256,), (257,), (3, 1000), (40, 13)])
def test_int4_error_at_most_half_a_step_per_group(shape, group_size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x[..., :1] += 5.0  # a few groups far from symmetric
    q = quantize_int4(x, group_size)
    y = dequantize_int4(q["codes"], q["scales"], q["zeros"], shape, group_size)
    step = q["scales"].repeat_interleave(group_size)[: x.numel()].view(shape)
    assert y.shape == x.shape
    assert ((y - x).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()


def test_int4_one_signed_group_does_not_saturate():
    """The reference's min/max formula clamps the zero point of an all-positive group and
    every code saturates; ours widens the range to contain 0."""
    x = torch.linspace(1.0, 2.0, 256)
    q = quantize_int4(x, 256)
    y = dequantize_int4(q["codes"], q["scales"], q["zeros"], x.shape, 256)
    assert (y - x).abs().max() <= q["scales"][0] / 2 + 1e-6


def test_int4_matches_q_galore_reference_on_mixed_sign_groups():
    from q_galore_torch.q_galore_projector import GaLoreProjector

    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(2))  # 3 groups of 256
    codes, scales, zeros, _ = GaLoreProjector(rank=8, quant=True, group_size=256, n_bit=4)._quantize(x, 256, 4)
    ours = quantize_int4(x, 256)
    assert torch.equal(unpack_int4(ours["codes"], x.numel()), codes.reshape(-1))
    assert torch.equal(ours["scales"], scales.reshape(-1))
    assert torch.equal(ours["zeros"].float(), zeros.reshape(-1))


def _op_cases():
    x = torch.randn(5, 77, generator=torch.Generator().manual_seed(3))
    packed, scales, zeros = torch.ops.lowrank_optim.int4_quantize(x, 64)
    codes8, s8, z8 = torch.ops.lowrank_optim.int8_quantize(x, 64, None)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    return {
        "int4_pack": (torch.randint(0, 16, (17,), dtype=torch.uint8),),
        "int4_unpack": (packed, x.numel()),
        "int4_quantize": (x, 64),
        "int4_dequantize": (packed, scales, zeros, x.numel(), 64, torch.bfloat16),
        "int8_quantize": (x, 64, noise),
        "int8_dequantize": (codes8, s8, z8, 64, torch.float32),
    }


@pytest.mark.parametrize("name", sorted(_op_cases()))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.lowrank_optim, name), _op_cases()[name])


# ---------------------------------------------------------------------------- INT4 basis
def _projector_bytes(pstate):
    return sum(v.numel() * v.element_size() for v in pstate.values() if isinstance(v, torch.Tensor))


def test_packed_basis_state_is_at_most_055_of_q_galore():
    from q_galore_torch.q_galore_projector import GaLoreProjector

    shape, rank = (256, 128), 32
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    reference = GaLoreProjector(rank=rank, quant=True, group_size=256, n_bit=4)
    reference.project(grad, 0)
    reference_bytes = sum(v.numel() * v.element_size() for v in vars(reference).values() if isinstance(v, torch.Tensor))

    w = nn.Parameter(torch.zeros(shape))
    opt = QGaLoreAdamW8bit([{"params": [w], "rank": rank}])
    w.grad = grad
    opt.step()
    pstate = opt.state[w]["projector"]
    assert not any(k in pstate for k in ("left", "right"))  # no dense basis kept
    assert pstate["right_codes"].dtype == torch.uint8 and pstate["right_codes"].numel() == rank * shape[1] // 2
    assert _projector_bytes(pstate) <= 0.55 * reference_bytes


def _refresh_counts(stable_steps=80, gap=2, seed=6):
    gen = torch.Generator().manual_seed(seed)
    stable, changing = nn.Parameter(torch.zeros(40, 24)), nn.Parameter(torch.zeros(40, 24))
    u, v = torch.randn(40, generator=gen), torch.randn(24, generator=gen)
    opt = QGaLoreAdamW8bit([{"params": [stable, changing], "rank": 4, "update_proj_gap": gap}], lr=1e-3)
    for _ in range(stable_steps):
        stable.grad = 5 * torch.outer(u, v) + 0.1 * torch.randn(40, 24, generator=gen)
        changing.grad = torch.randn(40, 24, generator=gen)
        opt.step()
    return opt.state[stable]["projector"], opt.state[changing]["projector"]


def test_lazy_refresh_stable_layer_gets_a_longer_gap():
    stable, changing = _refresh_counts()
    assert changing["gap"] == 2 and changing["refreshes"] == 40
    assert stable["gap"] >= 8 and stable["refreshes"] < 20
    assert stable["queued"] < 5  # the queue was cleared at each doubling


def test_queue_cleared_after_doubling_so_gap_grows_once_per_k_refreshes():
    stable, _ = _refresh_counts(stable_steps=80, gap=2)
    # gap 2 -> 4 after refresh 6 (5 similarities), -> 8 after 11, -> 16 after 16: the
    # reference would double at every refresh after the sixth (2, 4, 8, ..., 2**k).
    assert stable["gap"] == 16


def test_sign_flip_does_not_read_as_a_change():
    projector = QuantizedProjector(4, update_proj_gap=2)
    v = torch.nn.functional.normalize(torch.randn(30, generator=torch.Generator().manual_seed(7)), dim=0)
    pstate = {"similarities": torch.zeros(5), "queued": 0, "gap": 2}
    for sign in (1, -1, 1, -1, 1):
        pstate.update(projector._record_similarity(v, sign * v, pstate))
    assert pstate["gap"] == 4  # mean |cos| = 1 >= 0.4: doubled (signed cos would average 0.2)


def test_sign_alternating_gradient_still_extends_the_gap():
    gen = torch.Generator().manual_seed(8)
    w = nn.Parameter(torch.zeros(30, 20))
    u, v = torch.randn(30, generator=gen), torch.randn(20, generator=gen)
    opt = QGaLoreAdamW8bit([{"params": [w], "rank": 3, "update_proj_gap": 1}], lr=1e-3)
    for t in range(12):
        w.grad = (-1) ** t * (5 * torch.outer(u, v) + 0.05 * torch.randn(30, 20, generator=gen))
        opt.step()
    assert opt.state[w]["projector"]["gap"] >= 2


def test_lazy_false_keeps_the_group_gap():
    w = nn.Parameter(torch.zeros(20, 12))
    opt = QGaLoreAdamW8bit([{"params": [w], "rank": 2, "update_proj_gap": 1, "projector_args": {"lazy": False}}])
    u, v = torch.randn(20), torch.randn(12)
    for _ in range(12):
        w.grad = torch.outer(u, v)
        opt.step()
    assert opt.state[w]["projector"]["gap"] == 1 and opt.state[w]["projector"]["refreshes"] == 12


def test_rsvd_inner_with_its_options():
    w = nn.Parameter(torch.randn(20, 12))
    opt = QGaLoreAdamW8bit(
        [{"params": [w], "rank": 2, "projector_args": {"inner": "rsvd", "inner_args": {"oversample": 4}}}]
    )
    w.grad = torch.randn(20, 12)
    opt.step()
    assert "left_codes" in opt.state[w]["projector"] or "right_codes" in opt.state[w]["projector"]


# ---------------------------------------------------------------------------- INT8 weights
def test_stochastic_rounding_is_unbiased_and_differs_from_nearest():
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(9))
    draws = 3000
    total = torch.zeros_like(x, dtype=torch.float64)
    for i in range(draws):
        codes, scales, zeros = quantize_int8(x, 64, stochastic_round_generator(0, i, "cpu"))
        total += dequantize_int8(codes, scales, zeros, 64).double()
    step = scales.repeat_interleave(64)[: x.numel()].view(x.shape).double()
    nearest = dequantize_int8(*quantize_int8(x, 64, stochastic=False), 64).double()
    mean_error = (total / draws - x.double()).abs()
    assert (mean_error <= 3 * step / draws**0.5).all()  # per-draw std <= step / 2: 6 sigma
    assert (mean_error.mean() < 0.2 * (nearest - x.double()).abs().mean())
    assert not torch.equal(codes, quantize_int8(x, 64, stochastic=False)[0])


def test_small_updates_survive_stochastic_rounding_but_not_nearest():
    x0 = torch.randn(256, generator=torch.Generator().manual_seed(10))
    delta = 0.05 * (x0.max() - x0.min()) / 254  # a twentieth of a step
    results = {}
    for stochastic in (True, False):
        codes, scales, zeros = quantize_int8(x0, 256, stochastic=False)
        for t in range(100):
            x = dequantize_int8(codes, scales, zeros, 256) + delta
            codes, scales, zeros = quantize_int8(x, 256, stochastic_round_generator(1, t, "cpu"), stochastic)
        results[stochastic] = (dequantize_int8(codes, scales, zeros, 256) - x0).mean()
    assert abs(results[True] - 100 * delta) < 0.3 * 100 * delta
    assert abs(results[False]) < 0.1 * 100 * delta


class TinyModel(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.mlp = nn.Linear(24, 40, dtype=dtype)
        self.attn = nn.Linear(40, 17, dtype=dtype)
        self.head = nn.Linear(17, 1, dtype=dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.attn(torch.relu(self.mlp(x)))))


def _model(int8=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = TinyModel(dtype)
    if int8:
        convert_linear_to_int8(model, group_size=64)
    return model


def _groups(model, **kw):
    low = [model.mlp.weight, model.attn.weight]
    dense = [p for p in model.parameters() if all(p is not q for q in low)]
    return [{"params": low, "rank": 4, "update_proj_gap": 3, **kw}, {"params": dense}]


def _data(dtype=torch.float32):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 24, generator=gen)
    return x.to(dtype), torch.sin(x.sum(1, keepdim=True)).to(dtype)


def _train(model, opt, steps, start=0):
    x, y = _data(next(model.head.parameters()).dtype)
    losses = []
    for _ in range(start, start + steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_int8_linear_trains_and_weights_stay_uint8_without_fp32_copy():
    model = _model()
    opt = QGaLoreAdamW8bit(_groups(model), lr=1e-2, min_8bit_size=16)
    losses = _train(model, opt, 40)
    assert losses[-1] < 0.5 * losses[0]
    opt.zero_grad()
    for layer in (model.mlp, model.attn):
        assert isinstance(layer, Int8Linear) and layer.weight.dtype == torch.uint8
        assert layer.weight.float_grad is None  # zero_grad clears it too
        for key, value in opt.state[layer.weight].items():
            if isinstance(value, torch.Tensor):
                assert not (value.is_floating_point() and value.numel() >= layer.weight.numel()), key
        for value in opt.state[layer.weight]["projector"].values():
            if isinstance(value, torch.Tensor):
                assert value.numel() * value.element_size() < layer.weight.numel(), "dense basis or weight copy"


def test_int8_linear_matches_float_linear_forward_and_backward():
    torch.manual_seed(12)
    linear = nn.Linear(33, 9)
    x = torch.randn(5, 33, requires_grad=True)
    int8 = Int8Linear.from_linear(linear, group_size=64)
    with torch.no_grad():
        linear.weight.copy_(int8.dequantized_weight())
    x2 = x.detach().clone().requires_grad_()
    linear(x).square().sum().backward()
    int8(x2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(linear.weight.grad, int8.weight.float_grad, atol=1e-5)
    assert torch.allclose(linear.bias.grad, int8.bias.grad, atol=1e-5)


def test_int8_linear_accumulates_float_grad_and_survives_dtype_moves():
    model = _model()
    x, y = _data()
    for _ in range(2):
        nn.functional.mse_loss(model(x), y).backward()
    twice = model.mlp.weight.float_grad.clone()
    model.mlp.weight.float_grad = None
    nn.functional.mse_loss(model(x), y).backward()
    assert torch.allclose(twice, 2 * model.mlp.weight.float_grad, rtol=1e-5, atol=1e-7)

    before = model.mlp.dequantized_weight(torch.float32)
    model.to(torch.bfloat16)
    layer = model.mlp
    assert layer.weight.dtype == torch.uint8 and layer.weight_scales.dtype == torch.float32
    assert layer.weight.int8_scales is layer.weight_scales  # relinked after .to()
    assert torch.equal(layer.dequantized_weight(torch.float32), before)
    assert model(x.bfloat16()).dtype == torch.bfloat16


def test_failed_refresh_keeps_the_previous_int4_basis():
    w = nn.Parameter(torch.zeros(20, 12))
    opt = QGaLoreAdamW8bit([{"params": [w], "rank": 2, "update_proj_gap": 1}])
    w.grad = torch.randn(20, 12)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[w]["projector"].items() if isinstance(v, torch.Tensor)}
    w.grad = torch.full((20, 12), float("nan"))
    with pytest.warns(RuntimeWarning, match="refresh skipped"):
        opt.step()
    after = opt.state[w]["projector"]
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert after["refreshes"] == 1


def test_int8_without_stochastic_rounding_stalls_on_tiny_lr():
    """The paper's ablation in miniature: lr far below one INT8 step."""
    moved = {}
    for stochastic in (True, False):
        model = _model()
        start = model.mlp.dequantized_weight().clone()
        opt = QGaLoreAdamW8bit(_groups(model, stochastic_round=stochastic), lr=1e-4, min_8bit_size=16)
        _train(model, opt, 20)
        moved[stochastic] = (model.mlp.dequantized_weight() - start).abs().mean()
    assert moved[True] > 3 * moved[False]


def test_simulation_mode_trains_in_bf16():
    losses = {}
    weights = {}
    for simulate in (True, False):
        model = _model(int8=False, dtype=torch.bfloat16)
        opt = QGaLoreAdamW8bit(_groups(model), lr=1e-2, min_8bit_size=16, simulate=simulate)
        losses[simulate] = _train(model, opt, 40)
        weights[simulate] = model.mlp.weight.detach().clone()
        assert model.mlp.weight.dtype == torch.bfloat16
    assert losses[True][-1] < 0.5 * losses[True][0]
    assert not torch.equal(weights[True], weights[False])


@pytest.mark.parametrize("int8", [True, False], ids=["int8_linear", "simulate"])
def test_resume_through_weights_only_load_is_bit_identical(int8):
    def build(model):
        return QGaLoreAdamW8bit(_groups(model, update_proj_gap=1), lr=1e-2, min_8bit_size=16, simulate=not int8)

    model = _model(int8)
    opt = build(model)
    _train(model, opt, 9)  # gap 1: the similarity queue is full and has doubled the gap
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    _train(model, opt, 8, start=9)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = _model(int8, seed=1)
    model2.load_state_dict(saved["model"])
    opt2 = build(model2)
    opt2.load_state_dict(saved["optim"])
    _train(model2, opt2, 8, start=9)

    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert_same_state(opt, opt2)
    pstate = opt.state[model.mlp.weight]["projector"]
    assert pstate["gap"] > 1 and "similarities" in pstate  # the lazy schedule took part
    if int8:
        assert model.mlp.weight.dtype == torch.uint8


# ---------------------------------------------------------------------------- clipping, DDP
def _backward(model):
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()


def _all_grads(model):
    return [p.float_grad if hasattr(p, "int8_scales") else p.grad for p in model.parameters()]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_counts_and_scales_the_int8_float_grads(norm_type):
    model = _model()
    _backward(model)
    before = [g.clone() for g in _all_grads(model)]
    by_hand = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in before]), norm_type)
    total = clip_grad_norm_(model.parameters(), by_hand / 4, norm_type)
    torch.testing.assert_close(total, by_hand, rtol=1e-5, atol=0)
    for g, old in zip(_all_grads(model), before):
        torch.testing.assert_close(g, old * (by_hand / 4 / (by_hand + 1e-6)))


def test_torch_clip_grad_norm_misses_int8_weights_and_ours_matches_it_without_them():
    """The silent no-op that clip_grad_norm_ replaces, and that it is torch's otherwise."""
    model = _model()
    _backward(model)
    float_grad = model.mlp.weight.float_grad.clone()
    ours = clip_grad_norm_(model.parameters(), float("inf"))
    theirs = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert theirs < 0.9 * ours and torch.equal(model.mlp.weight.float_grad, float_grad)

    twins = [_model(int8=False) for _ in range(2)]
    for twin in twins:
        _backward(twin)
    norms = clip_grad_norm_(twins[0].parameters(), 0.1), torch.nn.utils.clip_grad_norm_(twins[1].parameters(), 0.1)
    assert torch.equal(*norms)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(twins[0].parameters(), twins[1].parameters()))
    with pytest.raises(ValueError, match="clip_grad_norm_: invalid int8_grad_sync='on'"):
        clip_grad_norm_(model.parameters(), 1.0, int8_grad_sync="on")


def test_int8_grad_sync_does_nothing_in_one_process():
    model = _model()
    _backward(model)
    opt = QGaLoreAdamW8bit(_groups(model), min_8bit_size=16)
    grad = model.mlp.weight.float_grad
    before = grad.clone()
    opt.sync_int8_grads()
    sync_int8_grads([model.mlp.weight, model.attn.weight])
    assert model.mlp.weight.float_grad is grad and torch.equal(grad, before) and not hasattr(grad, SYNCED)


def test_backward_and_zero_grad_clear_the_averaged_mark():
    """What keeps the averaging once per backward: a gradient marked averaged stops being so
    when a backward adds a local part to it, or when it is zeroed."""
    model = _model()
    opt = QGaLoreAdamW8bit(_groups(model), min_8bit_size=16)
    _backward(model)
    grad = model.mlp.weight.float_grad
    setattr(grad, SYNCED, True)  # as sync_int8_grads leaves it
    _backward(model)
    assert model.mlp.weight.float_grad is grad and getattr(grad, SYNCED) is False
    setattr(grad, SYNCED, True)
    opt.zero_grad(set_to_none=False)
    assert getattr(grad, SYNCED) is False


@pytest.fixture(scope="module")
def ddp_record(tmp_path_factory):
    """Both ranks' records of tests/_int8_ddp_worker.py (2 gloo processes, one spawn)."""
    out = tmp_path_factory.mktemp("int8_ddp")
    distributed_worker.spawn(int8_ddp.run, 2, str(out))
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]




@needs_gloo
@pytest.mark.parametrize("run", ["ddp", "ddp_clip"])
def test_int8_ddp_replicas_stay_identical_and_equal_one_process(ddp_record, run):
    rank0, rank1 = (record[run] for record in ddp_record)
    single = ddp_record[0]["single_clip" if run == "ddp_clip" else "single"]
    for key, value in rank0["state"].items():  # codes, scales, zeros, float parameters
        assert torch.equal(value, rank1["state"][key]), key
    # One process on the whole batch: the same up to the all-reduce's rounding, which could
    # flip a rare stochastically rounded code (none does here).
    initial = {name: getattr(int8_ddp.make_model(), name).dequantized_weight() for name in ("mlp", "attn")}
    for name, weight in rank0["dequantized"].items():
        step = single["state"][f"{name}.weight_scales"].max()
        assert (rank0["state"][f"{name}.weight"] != single["state"][f"{name}.weight"]).float().mean() <= 0.01
        assert (weight - single["dequantized"][name]).abs().max() <= 1.01 * step
        assert (single["dequantized"][name] - initial[name]).abs().max() > 5 * step  # and it trained
    for key, value in single["state"].items():
        if value.is_floating_point() and "scales" not in key:
            torch.testing.assert_close(rank0["state"][key], value, rtol=1e-5, atol=1e-6)
    # one all_reduce per step for every INT8 gradient; after the clip's, the step adds none
    assert rank0["all_reduces"] == [1] * int8_ddp.STEPS
    if run == "ddp_clip":
        assert min(single["norms"]) > int8_ddp.MAX_NORM  # the clip acted at every step
        assert rank0["norms"] == rank1["norms"]
        torch.testing.assert_close(torch.tensor(rank0["norms"]), torch.tensor(single["norms"]), rtol=1e-5, atol=0)


@needs_gloo
def test_int8_ddp_without_averaging_the_replicas_drift_apart(ddp_record):
    """int8_grad_sync="off": DDP averages the biases, nothing averages the INT8 weights."""
    rank0, rank1 = (record["ddp_off"] for record in ddp_record)
    for name in ("mlp", "attn"):
        assert (rank0["state"][f"{name}.weight"] != rank1["state"][f"{name}.weight"]).float().mean() > 0.3
    assert rank0["all_reduces"] == [0] * int8_ddp.STEPS


@needs_gloo
def test_int8_sync_of_a_gradient_some_ranks_lack(ddp_record):
    """Weight a has a gradient (ones) on rank 0 only, b on none: a gets the average on both
    ranks, b stays None; a second sync is free; a backward makes the next one reduce again."""
    for record in ddp_record:
        entry = record["missing_gradients"]
        assert torch.equal(entry["a"], torch.full((2, 3), 0.5)) and entry["b"] is None
        assert entry["calls"] == [1, 0, 1]


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"projector_args": {"inner": "random"}}, "inner"),
        ({"projector_args": {"group_size": 0}}, "group_size"),
        ({"projector_args": {"cos_threshold": 1.5}}, "cos_threshold"),
        ({"projector_args": {"gamma": 0.5}}, "gamma"),
        ({"projector_args": {"queue_size": 0}}, "queue_size"),
        ({"projector_args": {"lazy": "yes"}}, "lazy"),
        ({"projector_args": {"bogus": 1}}, "bogus"),
        ({"projector_args": {"inner": "rsvd", "inner_args": {"oversample": -1}}}, "oversample"),
        ({"projector_args": {"inner": "svd", "inner_args": {"oversample": 8}}}, "oversample"),
        ({"weight_group_size": 0}, "weight_group_size"),
        ({"simulate": "yes"}, "simulate"),
        ({"stochastic_round": 1}, "stochastic_round"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"int8_grad_sync": "on"}, "int8_grad_sync"),
    ],
)
def test_bad_inputs_raise_naming_the_key(kwargs, key):
    w = nn.Parameter(torch.zeros(8, 6))
    with pytest.raises(ValueError, match=f"QGaLoreAdamW8bit.*{key}"):
        QGaLoreAdamW8bit([{"params": [w], "rank": 2}], **kwargs)
    with pytest.raises(ValueError, match=f"QGaLoreAdamW8bit.*{key}"):
        QGaLoreAdamW8bit([{"params": [w], "rank": 2, **kwargs}])


def test_layerwise_with_int8_weights_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match="layerwise"):
        QGaLoreAdamW8bit(_groups(model), layerwise=True)


def test_convert_linear_to_int8_bad_inputs():
    with pytest.raises(ValueError, match="group_size"):
        convert_linear_to_int8(TinyModel(), group_size=0)
    with pytest.raises(ValueError, match="target_modules"):
        convert_linear_to_int8(TinyModel(), target_modules=("nothing",))


def _train_scaled(scaler, steps=5, attach=True, poison_at=None, unscale_first=False):
    """QGaLoreAdamW8bit on INT8 weights through torch.amp.GradScaler; returns (model, the
    weights' codes after each step)."""
    model = _model()
    opt = QGaLoreAdamW8bit(_groups(model), lr=1e-2, min_8bit_size=16)
    if attach:
        opt.attach_grad_scaler(scaler)
    x, y = _data()
    codes = []
    for step in range(steps):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if step == poison_at:
            model.mlp.weight.float_grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        codes.append(model.mlp.weight.detach().clone())
    return model, codes


def test_grad_scaler_unscales_int8_gradients_and_trains_as_without_it():
    """scaler.unscale_ sees only .grad; with attach_grad_scaler the step unscales the INT8
    weights' float gradients too, so a power-of-two scale changes no bit of the training."""
    plain = _model()
    opt = QGaLoreAdamW8bit(_groups(plain), lr=1e-2, min_8bit_size=16)
    _train(plain, opt, 5)
    scaled, _ = _train_scaled(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    for (name, p), q in zip(plain.state_dict().items(), scaled.state_dict().values()):
        assert torch.equal(p, q), name


def test_grad_scaler_skips_the_step_on_a_non_finite_int8_gradient():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _, codes = _train_scaled(scaler, steps=3, poison_at=1)
    assert torch.equal(codes[1], codes[0]) and not torch.equal(codes[2], codes[1])
    assert scaler.get_scale() == 2.0**9  # the overflow reached scaler.update, which backed off


def test_grad_scaler_with_int8_weights_is_refused_where_it_would_leave_them_scaled():
    with pytest.raises(RuntimeError, match=r"QGaLoreAdamW8bit: .*needs optimizer.attach_grad_scaler\(scaler\)"):
        _train_scaled(torch.amp.GradScaler("cpu"), attach=False)
    with pytest.raises(RuntimeError, match=r"scaler.unscale_\(optimizer\) leaves the gradients of INT8 weights"):
        _train_scaled(torch.amp.GradScaler("cpu"), unscale_first=True)


def test_grad_scaler_other_than_the_attached_one_is_refused_and_leaves_the_optimizer_usable():
    """Its scale and its overflow bookkeeping are not the attached scaler's; and a refused
    scaler.step must not leave torch's grad_scale/found_inf on the optimizer for the next step."""
    model = _model()
    opt = QGaLoreAdamW8bit(_groups(model), lr=1e-2, min_8bit_size=16)
    attached, other = torch.amp.GradScaler("cpu", init_scale=4.0), torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt.attach_grad_scaler(attached)
    x, y = _data()
    attached.scale(torch.ones(()))  # the attached scaler has a scale, just not the one in use
    other.scale(nn.functional.mse_loss(model(x), y)).backward()
    before = model.mlp.weight.detach().clone()
    with pytest.raises(RuntimeError, match="called by a GradScaler other than the attached one"):
        other.step(opt)
    assert torch.equal(model.mlp.weight, before)  # refused before anything stepped
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # a plain step afterwards works
    assert not torch.equal(model.mlp.weight, before)


def test_an_inner_product_dtype_is_refused_as_without_effect():
    """int4 multiplies from its INT4 codes; a product_dtype for the inner SVD would change
    nothing but the basis it quantizes, so it is refused rather than silently ignored."""
    w = torch.nn.Parameter(torch.randn(32, 24))
    with pytest.raises(ValueError, match=r"QGaLoreAdamW8bit: projector_args inner_args product_dtype='bfloat16'.*no effect"):
        QGaLoreAdamW8bit([{"params": [w], "rank": 4, "projector_args": {"inner_args": {"product_dtype": "bfloat16"}}}])
