"""Bad inputs raise ValueError at construction, with a message naming the parameter."""
from __future__ import annotations

import pytest
import torch

import lowrank_optim as lo


def mats():
    return [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(5, 12))]


def low(**kw):
    return [{"params": mats(), "rank": 2, **kw}]


# (id, builder, regex the message must match): the regex names the offending key and value.
BAD_INPUTS = [
    ("negative lr", lambda: lo.GaLoreAdamW(mats(), lr=-1.0), r"GaLoreAdamW: invalid lr=-1.0"),
    ("nan lr", lambda: lo.GaLoreAdamW(mats(), lr=float("nan")), r"invalid lr=nan"),
    ("beta1 >= 1", lambda: lo.GaLoreAdamW(mats(), betas=(1.0, 0.999)), r"invalid betas=\(1.0, 0.999\)"),
    ("betas triple", lambda: lo.GaLoreAdamW(mats(), betas=(0.9, 0.9, 0.9)), r"invalid betas="),
    ("negative eps", lambda: lo.GaLoreAdamW(mats(), eps=-1e-8), r"invalid eps=-1e-08"),
    ("negative decay", lambda: lo.GaLoreAdamW(mats(), weight_decay=-0.1), r"invalid weight_decay=-0.1"),
    ("negative rank", lambda: lo.GaLoreAdamW(low(rank=-3)), r"invalid rank=-3 in param group 0"),
    ("float rank", lambda: lo.GaLoreAdamW(low(rank=2.5)), r"invalid rank=2.5"),
    ("rank > matrix", lambda: lo.GaLoreAdamW(low(rank=7)), r"rank=7 is larger than the 8x6 matrix"),
    ("zero density", lambda: lo.GaLoreAdamW(mats(), density=0.0), r"invalid density=0.0"),
    ("rank and density", lambda: lo.GaLoreAdamW(low(density=0.5)), r"rank=2 and density=0.5 both set in param group 0"),
    ("zero gap", lambda: lo.GaLoreAdamW(low(update_proj_gap=0)), r"invalid update_proj_gap=0"),
    ("bogus proj_type", lambda: lo.GaLoreAdamW(low(proj_type="bogus")), r"invalid proj_type='bogus'"),
    ("unknown projector", lambda: lo.GaLoreAdamW(low(projector="qr")), r"invalid projector='qr'.*rsvd"),
    ("bad on_refresh", lambda: lo.GaLoreAdamW(low(on_refresh="drop")), r"invalid on_refresh='drop'"),
    ("bad eps_style", lambda: lo.GaLoreAdamW(mats(), eps_style="tf"), r"invalid eps_style='tf'"),
    ("misspelt group key", lambda: lo.GaLoreAdamW(low(update_gap=10)), r"unknown key in param group 0 'update_gap'"),
    (
        "unknown projector option",
        lambda: lo.GaLoreAdamW(low(projector="rsvd", projector_args={"oversampling": 4})),
        r"unknown projector_args key.*'oversampling'.*oversample, power_iters",
    ),
    (
        "bad projector option value",
        lambda: lo.GaLoreAdamW(low(projector="rsvd", projector_args={"power_iters": -1})),
        r"invalid power_iters=-1",
    ),
    (
        "bad random distribution",
        lambda: lo.GaLoreAdamW(low(projector="random", projector_args={"distribution": "cauchy"})),
        r"invalid distribution='cauchy'",
    ),
    (
        "1-D tensor in projected group",
        lambda: lo.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(64))], "rank": 2}]),
        r"parameter #0 \(shape \(64,\)\) in param group 0 cannot be projected: a 1-D tensor",
    ),
    (
        "4-D tensor in projected group",  # a 3-D one is a stack of matrices (fused experts)
        lambda: lo.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(4, 4, 4, 4))], "rank": 2}]),
        r"a 4-D tensor cannot be projected",
    ),
    (
        "named parameter in message",
        lambda: lo.GaLoreAdamW(lo.param_groups(torch.nn.ModuleDict({"attn": torch.nn.Linear(4, 3)}), rank=5)),
        r"parameter attn.weight \(shape \(3, 4\)\)",
    ),
    # torch.optim's keywords: the values we implement are accepted, others refused with the reason
    ("tensor lr", lambda: lo.GaLoreAdamW(mats(), lr=torch.tensor(1e-3)), r"invalid lr=tensor\(0.0010\) .* \(not a Tensor\)"),
    ("fused", lambda: lo.FiraAdamW(mats(), fused=True), r"FiraAdamW: fused=True is not supported: there is no fused kernel"),
    ("maximize", lambda: lo.GaLoreAdamW(mats(), maximize=True), r"maximize=True is not supported: .*negated objective"),
    ("capturable", lambda: lo.DCTAdamW(mats(), capturable=True), r"DCTAdamW: capturable=True .* CUDA graph"),
    ("differentiable", lambda: lo.GaLoreAdamW(mats(), differentiable=True), r"differentiable=True is not supported: the step runs under torch.no_grad"),
    ("amsgrad", lambda: lo.ApolloAdamW(mats(), amsgrad=True), r"ApolloAdamW: amsgrad=True is not supported"),
    ("zero accumulation", lambda: lo.GaLoreAdamW(mats(), layerwise=True, accumulation_steps=0), r"accumulation_steps=0"),
    ("negative clip", lambda: lo.GaLoreAdamW(mats(), layerwise=True, max_grad_norm=-1.0), r"max_grad_norm=-1.0"),
    ("8bit min size", lambda: lo.GaLoreAdamW8bit(mats(), min_8bit_size=0), r"GaLoreAdamW8bit: invalid min_8bit_size=0"),
    ("adafactor lr with relative step", lambda: lo.GaLoreAdafactor(mats(), lr=1e-3), r"lr=0.001 cannot be combined"),
    ("adafactor no lr", lambda: lo.GaLoreAdafactor(mats(), relative_step=False), r"lr=None needs relative_step"),
    (
        "adafactor warmup",
        lambda: lo.GaLoreAdafactor(mats(), lr=1e-3, relative_step=False, warmup_init=True),
        r"warmup_init=True requires relative_step=True",
    ),
    ("adafactor clip", lambda: lo.GaLoreAdafactor(mats(), clip_threshold=0.0), r"invalid clip_threshold=0.0"),
    ("adafactor beta1", lambda: lo.GaLoreAdafactor(mats(), beta1=1.5), r"invalid beta1=1.5"),
    ("negative scale", lambda: lo.GaLoreAdamW(low(scale=-0.25)), r"invalid scale=-0.25 in param group 0"),
    ("zero scale", lambda: lo.FiraAdamW(mats(), rank=2, scale=0.0), r"FiraAdamW: invalid scale=0.0"),
    ("adafactor positive decay_rate", lambda: lo.GaLoreAdafactor(mats(), decay_rate=0.8), r"invalid decay_rate=0.8.*< 0"),
    ("adafactor zero decay_rate", lambda: lo.GaLoreAdafactor(mats(), decay_rate=0.0), r"invalid decay_rate=0.0"),
    (
        "integer parameter",
        lambda: lo.GaLoreAdamW([torch.nn.Parameter(torch.ones(3, 3, dtype=torch.int64), requires_grad=False)]),
        r"parameter #0 \(shape \(3, 3\)\) in param group 0 has dtype torch.int64",
    ),
    (
        "complex parameter in projected group",
        lambda: lo.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(6, 4, dtype=torch.cfloat))], "rank": 2}]),
        r"parameter #0 \(shape \(6, 4\)\) in param group 0 cannot be projected: it is complex",
    ),
    ("create_optimizer unknown", lambda: lo.create_optimizer("galore_sgd", mats()), r"unknown optimizer 'galore_sgd'"),
    (
        "create_optimizer bad option",
        lambda: lo.create_optimizer("galore_adamw", mats(), rnak=4),
        r"has no option\(s\) \['rnak'\]; valid ones are: lr",
    ),
    (
        "create_optimizer model without rank",
        lambda: lo.create_optimizer("galore_adamw", torch.nn.Linear(3, 3)),
        r"given a model needs rank=",
    ),
    (
        "param_groups no match",
        lambda: lo.param_groups(torch.nn.Linear(3, 3), target_modules=("attn",), rank=2),
        r"no nn.Linear \(or Conv1D\) module name contains",
    ),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_at_construction(case):
    _, build, message = case
    with pytest.raises(ValueError, match=message):
        build()


def test_add_param_group_validates_and_leaves_optimizer_unchanged():
    opt = lo.GaLoreAdamW(low())
    with pytest.raises(ValueError, match=r"invalid rank=0 in param group 1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "rank": 0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "rank": 3, "scale": 1.0})
    assert opt.param_groups[1]["update_proj_gap"] == 200  # defaults filled in


def test_missing_bitsandbytes_gives_clear_import_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ImportError, match="GaLoreAdamW8bit needs the 'bitsandbytes' package"):
        lo.GaLoreAdamW8bit(mats())


@pytest.mark.parametrize("cls", [lo.GaLoreAdamW, lo.GaLoreAdamW8bit, lo.GaLoreAdafactor, lo.FiraAdamW, lo.FrugalAdamW, lo.DCTAdamW])
def test_signature_lists_every_hyperparameter_and_rejects_unknown_keywords(cls):
    import inspect

    signature = inspect.signature(cls)
    assert list(signature.parameters)[1:] == list(cls.hyperparameter_defaults())
    assert all(signature.parameters[k].default == v for k, v in cls.hyperparameter_defaults().items())
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'update_gap'; valid ones are: .*update_proj_gap"):
        cls(mats(), update_gap=10)
    opt = cls(mats(), rank=2, update_proj_gap=7)
    assert opt.param_groups[0]["update_proj_gap"] == 7 and "layerwise" not in opt.defaults


def int8_model():
    model = torch.nn.ModuleDict({"attn": torch.nn.Linear(16, 8), "mlp": torch.nn.Linear(8, 16)})
    return lo.quant.convert_linear_to_int8(model, target_modules=("attn",), group_size=32)


@pytest.mark.parametrize("name", [n for n in lo.available_optimizers() if n != "qgalore_adamw8bit"])
def test_int8_weights_are_refused_by_every_optimizer_that_cannot_step_them(name):
    """An INT8 weight's gradient is not .grad: any optimizer but Q-GaLore's would silently
    never train it, so construction refuses it, naming the parameter."""
    with pytest.raises(ValueError, match=r"parameter attn.weight \(shape \(8, 16\)\) in param group \d is an INT8 weight"):
        lo.create_optimizer(name, int8_model(), target_modules=("attn",), rank=4)
    with pytest.raises(ValueError, match=r"attn.weight .* is an INT8 weight"):  # in a dense group too
        lo.create_optimizer(name, int8_model(), target_modules=("mlp",), rank=4)


def test_qgalore_steps_int8_weights():
    model = int8_model()
    opt = lo.create_optimizer("qgalore_adamw8bit", model, target_modules=("attn",), rank=4, min_8bit_size=16)
    before = model["attn"].weight.detach().clone()
    model["mlp"](model["attn"](torch.randn(4, 16))).square().mean().backward()
    opt.step()
    assert not torch.equal(model["attn"].weight, before)


def test_numpy_integers_and_floats_are_accepted_as_plain_numbers():
    import numpy as np

    opt = lo.GaLoreAdamW(
        [{"params": mats(), "rank": np.int64(2), "update_proj_gap": np.int32(5)}], lr=np.float32(0.01), betas=(np.float64(0.9), 0.99)
    )
    group = opt.param_groups[0]
    assert type(group["rank"]) is int and type(group["update_proj_gap"]) is int and type(group["lr"]) is float
    assert all(type(b) is float for b in group["betas"])


def test_adafactor_relative_step_works_with_an_lr_scheduler():
    """With relative_step the group's lr is the relative step's multiplier (1.0), so a
    scheduler scales the step instead of failing on lr=None."""
    torch.manual_seed(0)
    runs = {}
    for factor in (1.0, 0.5):
        params = [torch.nn.Parameter(torch.ones(8, 6)), torch.nn.Parameter(torch.ones(5))]
        opt = lo.GaLoreAdafactor([{"params": params[:1], "rank": 2}, {"params": params[1:]}])
        assert opt.param_groups[0]["lr"] == 1.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factor)
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        opt.step()
        scheduler.step()
        runs[factor] = [1 - p.detach() for p in params]
    for full, half in zip(runs[1.0], runs[0.5]):
        torch.testing.assert_close(half, full * 0.5)


@pytest.mark.parametrize("name", lo.available_optimizers())
def test_torch_optim_keywords_at_their_default_are_accepted_as_torch_takes_them(name):
    """Code written for torch.optim.AdamW passes maximize=False, foreach=None, fused=None...:
    the values this package implements anyway are accepted and change nothing."""
    cls = lo.optim.OPTIMIZERS[name]
    torch_style = dict(maximize=False, foreach=None, fused=None, capturable=False, differentiable=False, amsgrad=False)
    a = cls([{"params": mats(), "rank": 2}], **torch_style)
    b = cls([{"params": mats(), "rank": 2}])
    assert a.defaults == b.defaults


def test_a_keyword_without_a_description_is_an_error_when_the_class_is_defined():
    """optim/argdocs.py fills the shared keyword descriptions into each class docstring; a
    class keyword that has none (neither its own nor a shared one) fails at definition."""
    with pytest.raises(TypeError, match=r"no description of keyword\(s\) \['brand_new'\]"):

        class Undocumented(lo.LowRankOptimizer):
            """An optimizer with an undocumented keyword.

            Args:
                lr: its own description.
            """

            method_defaults = {"lr": 1e-3, "brand_new": 1}


def test_shared_keyword_descriptions_show_each_class_its_own_default():
    """A class inherits a keyword's description (from a base class or the shared table) with
    its own default filled in: APOLLO-Mini's scale is √128, FRUGAL's on_refresh is reset."""
    for cls in lo.optim.OPTIMIZERS.values():
        assert "{default}" not in cls.__doc__, cls.__name__
    assert "scale: α, multiplies the projected-back update (default 11.3137)." in lo.ApolloMiniAdamW.__doc__
    assert 'default ``"tensor"``' in lo.ApolloMiniAdamW.__doc__ and 'default ``"channel"``' in lo.ApolloAdamW.__doc__
    assert 'on_refresh: the moments when the basis changes (default ``"reset"``)' in lo.FrugalAdamW.__doc__
    assert 'projector: how P is computed (default ``"rsvd"``)' in lo.GaLoreAdamW.__doc__
