"""``lowrank_optim.compat.galore_torch`` against the installed ``galore_torch`` (test-only oracle).

The usage of galore_torch's README (one dense group, one group of attention/MLP matrices
with rank, update_proj_gap, scale and proj_type; the optimizer built from those groups)
runs with only the import changed and trains to the bit: all three classes, every
proj_type, 7 steps with refreshes at steps 0, 3 and 6, real forward and backward passes.
"""
from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import twin_params
from test_galore_reference import run_pair

import lowrank_optim as lo
from lowrank_optim.compat import galore_torch as compat

galore_torch = pytest.importorskip("galore_torch")

CLASSES = ("GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
VOCAB, GAP, STEPS = 16, 3, 7


class TinyLM(torch.nn.Module):
    """Module names as in a transformer; no square matrix (galore_torch crashes on one
    with reverse_std), one taller and one wider projected weight, no zero-initialised
    tensor (see test_8bit_moves_what_galore_torch_with_bitsandbytes_050_never_moves)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 12)
        self.attn = torch.nn.Linear(12, 20)  # weight 20 x 12
        self.mlp = torch.nn.Linear(20, 9)  # weight 9 x 20
        self.head = torch.nn.Linear(9, VOCAB)

    def forward(self, tokens):
        hidden = torch.tanh(self.mlp(torch.tanh(self.attn(self.embed(tokens)))))
        return self.head(hidden)


def twin_models(seed=0):
    torch.manual_seed(seed)
    ours, ref = TinyLM(), TinyLM()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def readme_param_groups(model, proj_type, rank=4):
    """galore_torch's README usage: the weights of the attention and MLP modules are
    projected, every other parameter is in a plain group."""
    galore_params = [m.weight for name, m in model.named_modules() if name in ("attn", "mlp")]
    projected = {id(p) for p in galore_params}
    non_galore_params = [p for p in model.parameters() if id(p) not in projected]
    return [
        {"params": non_galore_params},
        {"params": galore_params, "rank": rank, "update_proj_gap": GAP, "scale": 0.25, "proj_type": proj_type},
    ]


def train(model, optimizer, steps, first=0):
    for step in range(first, first + steps):
        tokens = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(step))
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture
def galore_torch_8bit_on_cpu(monkeypatch):
    """galore_torch's 8-bit step calls torch.cuda.synchronize() after every parameter, which
    a CPU-only torch refuses; it only waits for the GPU, so a no-op leaves its arithmetic
    (bitsandbytes' CPU kernels) as it is."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)


def build(module, name, groups, kwargs):
    with warnings.catch_warnings():
        # galore_torch's AdamW warns that transformers' AdamW, which it copies, is deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        return getattr(module, name)(groups, **kwargs)


#: (class, keywords): the README's call, then galore_torch's other switches.
CASES = {
    "adamw_readme": ("GaLoreAdamW", {"lr": 0.01}),
    "adamw_decay_eps_no_bias_correction": (
        "GaLoreAdamW", {"lr": 0.01, "eps": 1e-3, "weight_decay": 0.1, "correct_bias": False},
    ),
    "adafactor_defaults": ("GaLoreAdafactor", {}),
    "adafactor_lr_beta1_decay": (
        "GaLoreAdafactor",
        {"lr": 0.01, "relative_step": False, "scale_parameter": False, "beta1": 0.9, "weight_decay": 0.1},
    ),
    # min_8bit_size 16: every low-rank gradient (80 entries; 16 for "full") and the larger
    # dense tensors get 8-bit moments, the 9-entry bias fp32 ones.
    "adamw8bit_decay": ("GaLoreAdamW8bit", {"lr": 0.01, "weight_decay": 0.1, "min_8bit_size": 16}),
}


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("case", CASES)
def test_readme_usage_trains_bit_identically(case, proj_type, galore_torch_8bit_on_cpu):
    name, kwargs = CASES[case]
    model, twin = twin_models()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours = build(compat, name, readme_param_groups(model, proj_type), kwargs)
    ref = build(galore_torch, name, readme_param_groups(twin, proj_type), kwargs)
    train(model, ours, STEPS)
    train(twin, ref, STEPS)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert not torch.equal(p, start[n]), f"{n} did not move"
        assert torch.equal(p, q), f"{n}: max difference {(p - q).abs().max().item():.3g}"
    state = ours.state[model.attn.weight]
    assert state["projector"]["refreshes"] == 3  # steps 0, 3 and 6
    if name == "GaLoreAdamW8bit":
        assert state["exp_avg"].dtype == ref.state[twin.attn.weight]["state1"].dtype == torch.uint8


def test_guide_recipe_needs_weight_decay_zero():
    """docs/guide.md: our GaLoreAdamW equals galore_torch's with projector="svd", eps=1e-6, weight_decay=0.0,
    eps_style="hf", decay_after_update=True; our default weight decay (1e-2) is not its 0."""
    recipe = {"lr": 0.01, "eps": 1e-6, "eps_style": "hf", "decay_after_update": True, "projector": "svd"}
    model, twin = twin_models(seed=1)
    ref = build(galore_torch, "GaLoreAdamW", readme_param_groups(twin, "std"), {"lr": 0.01})
    train(model, lo.GaLoreAdamW(readme_param_groups(model, "std"), weight_decay=0.0, **recipe), STEPS)
    train(twin, ref, STEPS)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    decayed, _ = twin_models(seed=1)
    train(decayed, lo.GaLoreAdamW(readme_param_groups(decayed, "std"), **recipe), STEPS)
    assert not torch.equal(decayed.attn.weight, twin.attn.weight)


@pytest.mark.parametrize("name", CLASSES)
def test_signature_and_defaults_are_galore_torchs(name):
    def described(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert described(getattr(compat, name)) == described(getattr(galore_torch, name))


@pytest.mark.parametrize("name", CLASSES)
def test_group_defaults_follow_galore_torch(name, galore_torch_8bit_on_cpu):
    p = torch.nn.Parameter(torch.randn(6, 5))
    ours = build(compat, name, [p], {})
    ref = build(galore_torch, name, [torch.nn.Parameter(p.detach().clone())], {})
    for key, value in ref.defaults.items():
        if key in ours.defaults:
            assert ours.defaults[key] == value, key
    assert {"lr", "eps", "weight_decay"} <= set(ref.defaults) & set(ours.defaults)


#: (class, keyword, value, words of the reason): galore_torch keywords whose value we do not implement.
REFUSED = [
    ("GaLoreAdamW8bit", "amsgrad", True, "no AMSGrad"),
    ("GaLoreAdamW8bit", "optim_bits", 16, "always keeps 8-bit moments"),
    ("GaLoreAdamW8bit", "args", {"lr": 1.0}, "per-parameter override"),
    ("GaLoreAdamW8bit", "percentile_clipping", 5, "percentile of recent gradient norms is not implemented"),
    ("GaLoreAdamW8bit", "block_wise", False, "only blockwise 8-bit moments"),
    ("GaLoreAdamW8bit", "is_paged", True, "paged optimizer state"),
]


@pytest.mark.parametrize("name, keyword, value, reason", REFUSED, ids=[r[1] for r in REFUSED])
def test_unsupported_values_are_refused_by_name_and_reason(name, keyword, value, reason):
    assert keyword in inspect.signature(getattr(galore_torch, name)).parameters  # galore_torch's keyword
    p = torch.nn.Parameter(torch.randn(6, 5))
    pattern = re.escape(f"compat.galore_torch.{name}: {keyword}={value!r} is not supported: ") + ".*" + reason
    with pytest.raises(ValueError, match=pattern):
        getattr(compat, name)([p], **{keyword: value})


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("GaLoreAdamW", {"correct_bias": False, "no_deprecation_warning": True}),
        ("GaLoreAdamW", {"no_deprecation_warning": False}),
        ("GaLoreAdamW8bit", {"optim_bits": 8, "amsgrad": False, "percentile_clipping": 100, "block_wise": True}),
        ("GaLoreAdamW8bit", {"optim_bits": 32, "args": None, "is_paged": False}),
    ],
)
def test_values_we_implement_are_accepted_without_warnings(name, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(compat, name)([torch.nn.Parameter(torch.randn(6, 5))], **kwargs)


def test_non_boolean_switches_are_refused():
    p = torch.nn.Parameter(torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"GaLoreAdamW: invalid no_deprecation_warning=1 in the constructor"):
        compat.GaLoreAdamW([p], no_deprecation_warning=1)
    with pytest.raises(ValueError, match=r"GaLoreAdamW: invalid correct_bias='no' in the constructor"):
        compat.GaLoreAdamW([p], correct_bias="no")


@pytest.mark.parametrize("name", CLASSES)
def test_keywords_galore_torch_lacks_are_type_errors_as_there(name):
    p = torch.nn.Parameter(torch.randn(6, 5))
    for cls in (getattr(compat, name), getattr(galore_torch, name)):
        with pytest.raises(TypeError, match="unexpected keyword argument 'layerwise'"):
            cls([p], layerwise=True)


def test_projected_group_needs_galore_torchs_four_keys():
    """galore_torch fails at its first step without them; we refuse at construction."""
    a, b = twin_params()
    partial = {"rank": 4, "update_proj_gap": 3, "proj_type": "std"}  # no scale
    with pytest.raises(ValueError, match=r"GaLoreAdamW: param group 1 sets rank=4 but not scale: .*KeyError"):
        compat.GaLoreAdamW([{"params": [a[3]]}, {"params": a[:1], **partial}])
    ref = build(galore_torch, "GaLoreAdamW", [{"params": b[:1], **partial}], {})
    b[0].grad = torch.ones_like(b[0])
    with pytest.raises(KeyError, match="scale"):
        ref.step()


def test_arithmetic_switches_are_pinned_per_group():
    p, q = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))
    low = {"rank": 2, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}
    with pytest.raises(ValueError, match=r"eps_style='torch' in param group 0 is not supported: .*eps_style='hf'"):
        compat.GaLoreAdamW([{"params": [p], "eps_style": "torch"}])
    compat.GaLoreAdamW([{"params": [p], "eps_style": "hf", "decay_after_update": True}])  # the pinned values
    opt = compat.GaLoreAdamW8bit([{"params": [p], **low}, {"params": [q]}])
    # galore_torch decays projected weights after the update, bitsandbytes dense ones before it.
    assert [g["decay_after_update"] for g in opt.param_groups] == [True, False]
    with pytest.raises(ValueError, match=r"decay_after_update=False in param group 0 is not supported"):
        compat.GaLoreAdamW8bit([{"params": [p], **low, "decay_after_update": False}])


@pytest.mark.parametrize("case", ["adamw_decay_eps_no_bias_correction", "adafactor_lr_beta1_decay", "adamw8bit_decay"])
def test_resume_from_state_dict_is_exact(case):
    name, kwargs = CASES[case]
    model, twin = twin_models(seed=2)
    straight = build(compat, name, readme_param_groups(model, "std"), kwargs)
    train(model, straight, STEPS)
    first = build(compat, name, readme_param_groups(twin, "std"), kwargs)
    train(twin, first, 4)
    resumed = build(compat, name, readme_param_groups(twin, "std"), kwargs)
    resumed.load_state_dict(first.state_dict())
    train(twin, resumed, STEPS - 4, first=4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_8bit_moves_what_galore_torch_with_bitsandbytes_050_never_moves(galore_torch_8bit_on_cpu):
    """Where we differ on purpose.  bitsandbytes 0.50's Optimizer2State takes max_unorm and
    skip_zeros where galore_torch passes percentile_clipping=100 and block_wise=True, so
    fp32 moments clip each update to 100x the norm of the tensor stepped: a projected
    matrix with fp32 moments (stepped through a zeroed scratch weight) and a zero bias
    never move there; both move here."""
    from bitsandbytes.optim.optimizer import Optimizer2State

    if "percentile_clipping" in inspect.signature(Optimizer2State.__init__).parameters:
        pytest.skip("this bitsandbytes takes galore_torch's positional arguments as meant")
    a, b = twin_params(seed=11)  # a[0] is 37 x 20: its rank-4 gradient has 148 < 4096 entries
    zero_a, zero_b = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    low = {"rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}
    ours = compat.GaLoreAdamW8bit([{"params": [zero_a]}, {"params": a[:1], **low}], weight_decay=0.0)
    ref = galore_torch.GaLoreAdamW8bit([{"params": [zero_b]}, {"params": b[:1], **low}], weight_decay=0.0)
    start = a[0].detach().clone()
    run_pair(ours, ref, [zero_a, a[0]], [zero_b, b[0]], 4)
    assert torch.equal(b[0], start) and not zero_b.any()
    assert not torch.equal(a[0], start) and zero_a.all()
    assert ours.state[a[0]]["exp_avg"].dtype == torch.float32


def test_a_checkpoint_of_our_galore_adamw_cannot_bring_its_arithmetic_in():
    """Both classes are named GaLoreAdamW; the compat class's pinned values are checked on
    load as at construction, so our eps_style="torch" checkpoint is refused."""
    import lowrank_optim

    p = torch.nn.Parameter(torch.randn(6, 5))
    ours = lowrank_optim.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 2, "scale": 0.25,
                                       "proj_type": "std"}])
    p.grad = torch.randn_like(p)
    ours.step()
    twin = compat.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}])
    with pytest.raises(ValueError, match=r"eps_style='torch' in param group 0 is not supported.*loading a checkpoint"):
        twin.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("cls", ["GaLoreAdamW", "GaLoreAdafactor"])
def test_bf16_products_are_refused_at_construction_and_on_load(cls):
    """galore_torch multiplies in the gradient's dtype: product_dtype='bfloat16' is ours only."""
    p = torch.nn.Parameter(torch.randn(6, 5))
    group = {"params": [p], "rank": 2, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}
    with pytest.raises(ValueError, match=r"projector_args product_dtype='bfloat16' in param group 0 is not supported"):
        getattr(compat, cls)([{**group, "projector_args": {"product_dtype": "bfloat16"}}])
    ours = lo.GaLoreAdamW([{**group, "projector": "svd", "projector_args": {"product_dtype": "bfloat16"}}],
                          eps=1e-6, eps_style="hf", decay_after_update=True)
    p.grad = torch.randn_like(p)
    ours.step()
    twin = compat.GaLoreAdamW([group])
    with pytest.raises(ValueError, match=r"product_dtype='bfloat16' in param group 0 is not supported"):
        twin.load_state_dict(ours.state_dict())
