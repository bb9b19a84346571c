"""Layer-wise mode: parameters stepped from gradient hooks, gradients freed during backward."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import lowrank_optim as lo


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict(
        {"attn": torch.nn.Linear(12, 20), "mlp": torch.nn.Linear(20, 12), "head": torch.nn.Linear(12, 3)}
    )
    data = [(torch.randn(16, 12), torch.randn(16, 3)) for _ in range(12)]
    return model, data


def loss_fn(model, x, y):
    h = torch.tanh(model["attn"](x))
    return torch.nn.functional.mse_loss(model["head"](model["mlp"](h)), y)


def build(model, **kw):
    return lo.GaLoreAdamW(lo.param_groups(model, ("attn", "mlp"), rank=4, update_proj_gap=3), lr=1e-2, **kw)


def train(model, opt, data, accumulation=1, clip=None, scheduler=None, layerwise=False):
    for i in range(0, len(data), accumulation):
        for x, y in data[i : i + accumulation]:
            (loss_fn(model, x, y) / accumulation).backward()
        if not layerwise:
            if clip is not None:
                for p in model.parameters():  # per-parameter clipping, as the layer-wise mode does
                    torch.nn.utils.clip_grad_norm_([p], clip)
            opt.step()
            opt.zero_grad()
        else:
            opt.step()  # runs no update; kept so user loops stay unchanged
        if scheduler is not None:
            scheduler.step()


def twins(**layerwise_kw):
    model, data = model_and_data()
    twin, _ = model_and_data()
    twin.load_state_dict(model.state_dict())
    return model, twin, data, build(model), build(twin, layerwise=True, **layerwise_kw)


def assert_same_params(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_layerwise_equals_a_regular_step():
    model, twin, data, opt, lw = twins()
    train(model, opt, data)
    train(twin, lw, data, layerwise=True)
    assert_same_params(model, twin)


def test_layerwise_frees_gradients_during_backward():
    _, model, data, _, lw = twins()
    live = []
    # Backward reaches the head before attn: when attn's gradient arrives, the head's has
    # already been consumed and freed.
    model["attn"].weight.register_post_accumulate_grad_hook(lambda p: live.append(model["head"].weight.grad))
    loss_fn(model, *data[0]).backward()
    assert live == [None]
    assert all(p.grad is None for p in model.parameters())
    assert lw.state[model["attn"].weight]["step"] == 1


def test_layerwise_honours_gradient_accumulation():
    model, twin, data, opt, lw = twins(accumulation_steps=3)
    train(model, opt, data, accumulation=3)
    train(twin, lw, data, accumulation=3, layerwise=True)
    assert_same_params(model, twin)
    assert lw.state[twin["attn"].weight]["step"] == len(data) // 3


def test_layerwise_clips_each_gradient():
    model, twin, data, opt, lw = twins(max_grad_norm=0.05)
    train(model, opt, data, clip=0.05)
    train(twin, lw, data, layerwise=True)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    unclipped, _ = model_and_data()
    train(unclipped, build(unclipped), data)
    assert not torch.allclose(unclipped["head"].weight, twin["head"].weight)  # clipping acted


def test_layerwise_follows_the_lr_schedule_at_full_speed():
    model, twin, data, opt, lw = twins()
    schedule = lambda step: 1.0 / (1 + step)  # noqa: E731
    train(model, opt, data, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    train(twin, lw, data, scheduler=torch.optim.lr_scheduler.LambdaLR(lw, schedule), layerwise=True)
    assert_same_params(model, twin)


def test_layerwise_state_saves_and_resumes_bit_identically():
    model, twin, data, _, lw = twins(accumulation_steps=2)
    # Checkpoints are taken at optimizer-step boundaries: a partly accumulated gradient lives
    # in p.grad, which no training loop saves.
    train(twin, lw, data[:4], accumulation=1, layerwise=True)
    buffer = io.BytesIO()
    torch.save({"model": twin.state_dict(), "optim": lw.state_dict()}, buffer)
    train(twin, lw, data[4:], accumulation=1, layerwise=True)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, _ = model_and_data(seed=1)
    resumed.load_state_dict(saved["model"])
    lw2 = build(resumed, layerwise=True, accumulation_steps=2)
    lw2.load_state_dict(saved["optim"])
    train(resumed, lw2, data[4:], accumulation=1, layerwise=True)
    assert_same_params(twin, resumed)


def test_remove_hooks_detaches_the_optimizer():
    model, _, data, _, lw = twins()
    lw.remove_hooks()
    loss_fn(model, *data[0]).backward()
    assert model["attn"].weight.grad is not None and not lw.state


def branch_loss(model, x, y, use_mlp):
    """The MLP takes part only when ``use_mlp``: its weights get no gradient otherwise."""
    h = torch.tanh(model["attn"](x))
    return torch.nn.functional.mse_loss(model["head"](model["mlp"](h) if use_mlp else h[:, :12]), y)


def train_with_gaps(model, opt, data, pattern, accumulation, layerwise):
    for i in range(0, len(data), accumulation):
        for j, (x, y) in enumerate(data[i : i + accumulation]):
            (branch_loss(model, x, y, pattern(i + j)) / accumulation).backward()
        if not layerwise:
            opt.step()
            opt.zero_grad()
        else:
            opt.step()


@pytest.mark.parametrize("pattern", [lambda i: i % 3 != 2, lambda i: i % 3 != 0, lambda i: i % 2 == 0],
                         ids=["missing_last", "missing_first", "alternating"])
def test_layerwise_accumulation_with_parameters_missing_some_micro_batches(pattern):
    """Micro-batches are counted per optimizer step, not per parameter: a parameter that got
    no gradient on some micro-batch steps once per window on that window's sum, as in a
    regular accumulated step, and no gradient leaks into the next window."""
    model, twin, data, opt, lw = twins(accumulation_steps=3)
    train_with_gaps(model, opt, data, pattern, 3, layerwise=False)
    train_with_gaps(twin, lw, data, pattern, 3, layerwise=True)
    assert_same_params(model, twin)
    assert all(p.grad is None for p in twin.parameters())
    assert lw.state[twin["mlp"].weight]["step"] == opt.state[model["mlp"].weight]["step"]


def scaled_training(model, opt, data, scaler, layerwise, blow_up_at=()):
    for i, (x, y) in enumerate(data):
        loss = loss_fn(model, x, y) * (1e38 if i in blow_up_at else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if not layerwise:
            opt.zero_grad()


def test_layerwise_with_grad_scaler_unscales_and_skips_non_finite_steps():
    model, twin, data, opt, lw = twins()
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=100) for _ in range(2)]
    lw.attach_grad_scaler(scalers[1])
    scaled_training(model, opt, data, scalers[0], layerwise=False, blow_up_at=(4,))
    scaled_training(twin, lw, data, scalers[1], layerwise=True, blow_up_at=(4,))
    assert_same_params(model, twin)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**11  # the overflow halved it in both
    assert lw.state[twin["attn"].weight]["step"] == len(data) - 1  # the overflowing step was skipped


def test_layerwise_with_an_unattached_grad_scaler_is_refused_clearly():
    _, model, data, _, lw = twins()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_fn(model, *data[0])).backward()
    with pytest.raises(RuntimeError, match=r"layerwise=True with torch.amp.GradScaler needs optimizer.attach_grad_scaler"):
        scaler.step(lw)
    with pytest.raises(ValueError, match="attach_grad_scaler is for layerwise=True"):
        build(model).attach_grad_scaler(scaler)


def test_layerwise_optimizer_survives_deepcopy():
    """The copy keeps layer-wise mode and its options, with hooks on its own parameters."""
    _, model, data, _, lw = twins(accumulation_steps=2, max_grad_norm=0.5)
    twin = copy.deepcopy(lw)
    assert (twin.layerwise, twin.accumulation_steps, twin.max_grad_norm) == (True, 2, 0.5)
    originals, copies = (list(p for g in o.param_groups for p in g["params"]) for o in (lw, twin))
    for params in (originals, copies):
        for _ in range(2):  # one window of two micro-batches
            sum((p * torch.arange(p.numel()).view_as(p)).sin().sum() for p in params).backward()
    for p, q in zip(originals, copies):
        assert torch.equal(p, q) and p.grad is None and q.grad is None
    assert twin.state[copies[0]]["step"] == lw.state[originals[0]]["step"] == 1


def test_end_window_when_follows_the_loops_own_windows():
    """Windows of 2, 1, 3, 2, 1, 3 micro-batches, told by a predicate (as the Trainer's
    sync_gradients tells them) instead of counted: the same as accumulating by hand."""
    sizes = [2, 1, 3, 2, 1, 3]
    model, twin, data, opt, lw = twins()
    last = {"now": False}
    lw.end_window_when(lambda: last["now"])
    start = 0
    for size in sizes:
        window = data[start : start + size]
        start += size
        for j, (x, y) in enumerate(window):
            (loss_fn(model, x, y) / size).backward()
            last["now"] = j == size - 1
            (loss_fn(twin, x, y) / size).backward()
        opt.step()
        opt.zero_grad()
        lw.step()
    assert_same_params(model, twin)
    assert lw.state[twin["attn"].weight]["step"] == len(sizes)
    with pytest.raises(ValueError, match="end_window_when needs a callable"):
        lw.end_window_when(3)
    with pytest.raises(ValueError, match="end_window_when is for layerwise=True"):
        opt.end_window_when(lambda: True)


def test_layerwise_step_steps_gradients_that_no_hook_saw():
    """Gradients assigned by hand (or DCP's zeros, see test_layerwise_distributed.py) step
    in step(), as a regular step would; while a window is open, step() leaves them."""
    model, twin, data, opt, lw = twins()
    for m in (model, twin):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
    opt.step()
    lw.step()
    assert_same_params(model, twin)
    assert lw.state[twin["attn"].weight]["step"] == 1

    _, model, data, _, lw = twins(accumulation_steps=2)
    loss_fn(model, *data[0]).backward()  # the first of two micro-batches: the window is open
    before = [p.detach().clone() for p in model.parameters()]
    lw.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not lw.state
    assert all(p.grad is not None for p in model.parameters())


def test_attach_ddp_without_a_model_waits_once_and_is_removed_with_the_hooks():
    from torch.nn.modules import module

    _, model, _, _, lw = twins()
    before = len(module._global_forward_pre_hooks)
    lw.attach_ddp()  # waits for the DistributedDataParallel that wraps these parameters
    assert len(module._global_forward_pre_hooks) == before + 1
    with pytest.raises(ValueError, match="attach_ddp was already called"):
        lw.attach_ddp()
    lw.remove_hooks()
    assert len(module._global_forward_pre_hooks) == before
