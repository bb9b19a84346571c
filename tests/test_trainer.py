"""Hugging Face Trainer integration: optim="lowrank_<name>", optim_args, resume, factory."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import lowrank_optim as lo  # noqa: E402
from lowrank_optim.integrations import transformers as integ  # noqa: E402
from conftest import needs_gloo  # noqa: E402

NAMES = integ.register()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12, seed=1):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out, **kw):
    base = dict(
        output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=4, max_steps=6,
        learning_rate=1e-2, weight_decay=0.1, logging_steps=100, save_steps=3, save_strategy="steps",
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        optim_target_modules=["attn", "mlp"],
    )
    base.update(kw)
    return TrainingArguments(**base)


RESUME_CASES = {
    "lowrank_galore_adamw": "rank=4,update_proj_gap=2,scale=0.25",
    "lowrank_fira_adamw": "rank=4,update_proj_gap=2",
    "lowrank_galore_adamw8bit": "rank=4,update_proj_gap=2,min_8bit_size=16",
    "lowrank_apollo_adamw": "rank=4,update_proj_gap=2",
    "lowrank_apollo_mini_adamw": "update_proj_gap=2",  # the preset's rank 1
}


@pytest.mark.parametrize("optim", sorted(RESUME_CASES))
def test_save_and_resume_equals_uninterrupted(tmp_path, optim):
    data = TokenData()
    args = training_args(tmp_path / "full", optim=optim, optim_args=RESUME_CASES[optim])
    full = Trainer(model=tiny_model(), args=args, train_dataset=data)
    full.train()
    opt = full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer  # accelerate wraps it
    assert isinstance(opt, lo.LowRankOptimizer)
    if "8bit" in optim:  # min_8bit_size=16 made the tiny model's moments really 8-bit
        assert any(s["exp_avg"].dtype == torch.uint8 for s in opt.state.values())
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()
    # The Trainer loads it with weights_only=True: our state must be plain tensors and ints.
    torch.load(checkpoint / "optimizer.pt", weights_only=True)

    args2 = training_args(tmp_path / "resumed", optim=optim, optim_args=RESUME_CASES[optim])
    resumed = Trainer(model=tiny_model(seed=5), args=args2, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    moved = False
    start = tiny_model().state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
        moved |= not torch.equal(a[key], start[key])
    assert moved


def test_trainer_route_says_once_what_it_projected(tmp_path, capsys, monkeypatch):
    """The Trainer route prints the factory's one-line summary (matrices, share, rank) once."""
    from lowrank_optim import factory

    monkeypatch.setattr(factory, "_announced", set())  # earlier tests may have printed the same line
    model = tiny_model()
    args = training_args(tmp_path, optim="lowrank_galore_adamw", optim_args="rank=4",
                         optim_target_modules=["self_attn", "mlp"])
    for _ in range(2):
        Trainer.get_optimizer_cls_and_kwargs(args, model)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lowrank_optim: projecting")]
    total = sum(p.numel() for p in model.parameters())
    projected = sum(m.weight.numel() for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and (".self_attn." in n or ".mlp." in n))
    assert lines == [f"lowrank_optim: projecting 14 matrices ({100 * projected / total:.1f}% of {total:,} "
                     "parameters) at rank 4; the rest is dense"]


def test_every_optimizer_name_builds_and_steps(tmp_path):
    """Every optimizer under its name and its layer-wise name (a factory, as the Trainer
    calls it): one step moves the weights."""
    from lowrank_optim.options import aliases

    assert len(NAMES) == 2 * (len(lo.available_optimizers()) + len(aliases()))
    batch = TokenData(n=2)[0]
    for name in NAMES:
        model = tiny_model()
        before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
        args = training_args(tmp_path, optim=name, optim_args="rank=4")
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if name.endswith("_layerwise"):
            opt = cls()(model, **kwargs)
            assert opt.layerwise
        else:
            opt = cls(kwargs.pop("params"), **kwargs)
            assert not opt.layerwise
        loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before), name


def test_register_is_idempotent():
    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    before = (len(list(OptimizerNames)), len(trainer_optimizer._OPTIMIZER_HANDLERS))
    assert integ.register() == NAMES
    assert integ.register() == NAMES
    assert (len(list(OptimizerNames)), len(trainer_optimizer._OPTIMIZER_HANDLERS)) == before
    assert OptimizerNames("lowrank_galore_adamw") is OptimizerNames.LOWRANK_GALORE_ADAMW
    assert OptimizerNames("galore_adamw") is OptimizerNames.GALORE_ADAMW  # built-ins untouched


def test_version_check_names_version(monkeypatch):
    import sys

    # The module object register() imports (transformers swaps its own sys.modules entry).
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.40.0")
    with pytest.raises(RuntimeError, match="transformers 4.40.0"):
        integ.register()


def test_missing_transformers_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match="needs transformers >=5.23"):
        integ.register()


def test_hf_argument_parser_command_line(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none",
        "--optim", "lowrank_galore_adamw", "--optim_target_modules", r".*\.(self_attn|mlp)\..*",  # one value on a command line: a regex
        "--optim_args", "rank=4,update_proj_gap=7,betas=0.8:0.9",
    ])
    assert args.optim.value == "lowrank_galore_adamw"
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, tiny_model())
    assert cls is lo.GaLoreAdamW
    assert kwargs["update_proj_gap"] == 7 and kwargs["betas"] == (0.8, 0.9)
    assert kwargs["params"][0]["rank"] == 4
    assert len(kwargs["params"][0]["params"]) == 2 * 7  # q k v o gate up down, two layers


def test_optim_args_types():
    parsed = integ.parse_optim_args(
        "galore_adamw",
        "rank=64,update_proj_gap=200,scale=0.25,betas=0.9:0.95,decay_after_update=true,proj_type=left,"
        "density=none,projector_args=distribution:gaussian;oversample:4",
    )
    assert parsed == {
        "rank": 64, "update_proj_gap": 200, "scale": 0.25, "betas": (0.9, 0.95), "decay_after_update": True,
        "proj_type": "left", "density": None, "projector_args": {"distribution": "gaussian", "oversample": 4},
    }
    assert type(parsed["scale"]) is float and type(parsed["rank"]) is int
    ada = integ.parse_optim_args("lowrank_galore_adafactor", "eps=1e-30:1e-3,beta1=0.9,relative_step=0")
    assert ada == {"eps": (1e-30, 1e-3), "beta1": 0.9, "relative_step": False}


def test_optim_args_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown optim_args key 'rnak'; valid keys are: .*rank.*update_proj_gap"):
        integ.parse_optim_args("galore_adamw", "rnak=4")
    with pytest.raises(ValueError, match="rank='four' is not an integer"):
        integ.parse_optim_args("galore_adamw", "rank=four")
    with pytest.raises(ValueError, match="not a boolean"):
        integ.parse_optim_args("galore_adamw", "decay_after_update=maybe")
    with pytest.raises(ValueError, match="needs 2 values"):
        integ.parse_optim_args("galore_adamw", "betas=0.9")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        integ.parse_optim_args("galore_adamw", "accumulation_steps=2")
    # the package's one syntax: a tuple may also be written as pretrain.py's --opt-arg takes it
    assert integ.parse_optim_args("galore_adamw", "betas=(0.8,0.9),rank=3") == {"betas": (0.8, 0.9), "rank": 3}
    # Range checks are the optimizer's own, raised when the Trainer builds it.
    args = training_args(tmp_path, optim="lowrank_galore_adamw", optim_args="rank=-3")
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=TokenData())
    with pytest.raises(ValueError, match="rank=-3"):
        trainer.create_optimizer()
    args = training_args(tmp_path, optim="lowrank_galore_adamw", optim_args="update_proj_gap=3")
    with pytest.raises(ValueError, match="needs rank"):
        Trainer.get_optimizer_cls_and_kwargs(args, tiny_model())
    args = training_args(tmp_path, optim="lowrank_galore_adamw", optim_args="rank=4", optim_target_modules=["nope"])
    with pytest.raises(ValueError, match=r"no nn.Linear \(or Conv1D\) module matches"):
        Trainer.get_optimizer_cls_and_kwargs(args, tiny_model())


def _groups_by_kind(opt):
    kinds = {}
    for g in opt.param_groups:
        kind = "low" if g.get("rank") else ("decay" if g["weight_decay"] else "no_decay")
        kinds[kind] = g
    return kinds


def test_training_arguments_reach_the_groups(tmp_path):
    args = training_args(
        tmp_path, optim="lowrank_fira_adamw", optim_args="rank=4", learning_rate=3e-3, weight_decay=0.05,
        adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6, optim_target_modules=r".*\.mlp\..*",
    )
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=TokenData())
    opt = trainer.create_optimizer()
    kinds = _groups_by_kind(opt)
    assert set(kinds) == {"low", "decay", "no_decay"}
    for g in opt.param_groups:
        assert g["lr"] == 3e-3 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6
    assert kinds["low"]["weight_decay"] == 0.05 and kinds["decay"]["weight_decay"] == 0.05
    assert all(".mlp." in n and n.endswith(".weight") for n in kinds["low"]["param_names"])  # regex target
    assert any("self_attn" in n for n in kinds["decay"]["param_names"])
    no_decay = kinds["no_decay"]["param_names"]
    assert no_decay and all("norm" in n or "bias" in n for n in no_decay)
    assert kinds["no_decay"]["weight_decay"] == 0.0
    names = {n for g in opt.param_groups for n in g["param_names"]}
    assert names == {n for n, _ in trainer.model.named_parameters()}
    # optim_args win over TrainingArguments.
    args = training_args(tmp_path, optim="lowrank_galore_adamw", optim_args="rank=4,betas=0.5:0.6,weight_decay=0.2")
    opt = Trainer(model=tiny_model(), args=args, train_dataset=TokenData()).create_optimizer()
    kinds = _groups_by_kind(opt)
    assert kinds["low"]["betas"] == (0.5, 0.6) and kinds["decay"]["weight_decay"] == 0.2
    assert kinds["no_decay"]["weight_decay"] == 0.0


def test_adafactor_gets_training_lr(tmp_path):
    args = training_args(tmp_path, optim="lowrank_galore_adafactor", optim_args="rank=4", learning_rate=2e-3)
    opt = Trainer(model=tiny_model(), args=args, train_dataset=TokenData()).create_optimizer()
    assert all(g["lr"] == 2e-3 and not g["relative_step"] for g in opt.param_groups)


def test_optimizer_cls_and_kwargs_factory(tmp_path):
    with pytest.raises(ValueError, match="valid ones are"):
        integ.optimizer_cls_and_kwargs("galore_adamw", rnak=4)
    with pytest.raises(ValueError, match="max_grad_norm"):
        integ.optimizer_cls_and_kwargs("galore_adamw", rank=4, max_grad_norm=1.0)
    args = training_args(tmp_path, max_steps=2, save_strategy="no", learning_rate=4e-3, weight_decay=0.03)
    factory = integ.optimizer_cls_and_kwargs("fira_adamw", args=args, target_modules=["mlp"], rank=4,
                                             update_proj_gap=2)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=TokenData(), optimizer_cls_and_kwargs=factory)
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, lo.FiraAdamW)
    kinds = _groups_by_kind(opt)
    assert kinds["low"]["rank"] == 4 and kinds["low"]["update_proj_gap"] == 2
    assert all(".mlp." in n for n in kinds["low"]["param_names"])
    assert kinds["decay"]["weight_decay"] == 0.03 and kinds["no_decay"]["weight_decay"] == 0.0
    assert all(g["initial_lr"] == 4e-3 for g in opt.param_groups)
    assert all(len(opt.state[p]) for p in kinds["low"]["params"])


# --------------------------------------------------------------------------- layer-wise mode
LAYERWISE_CASES = {
    "lowrank_galore_adamw": "rank=4,update_proj_gap=2",
    "lowrank_fira_adamw": "rank=4,update_proj_gap=2",
}


def layerwise_args(out, optim, **kw):
    # 20 samples in batches of 4 are 5 micro-batches an epoch: with 2 per window the last
    # window of each epoch has one, so the optimizer must follow the Trainer's windows.
    return training_args(out, optim=optim, optim_args=LAYERWISE_CASES[optim.removesuffix("_layerwise")],
                         gradient_accumulation_steps=2, max_grad_norm=0.0, **kw)


def unwrapped(trainer):
    return trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer


@pytest.mark.parametrize("optim", sorted(LAYERWISE_CASES))
def test_layerwise_trainer_equals_the_regular_one_with_accumulation(tmp_path, optim):
    data = TokenData(n=20)
    regular = Trainer(model=tiny_model(), args=layerwise_args(tmp_path / "r", optim), train_dataset=data)
    regular.train()
    layerwise = Trainer(model=tiny_model(), args=layerwise_args(tmp_path / "l", optim + "_layerwise"),
                        train_dataset=data)
    layerwise.train()
    opt = unwrapped(layerwise)
    assert opt.layerwise and not unwrapped(regular).layerwise
    assert layerwise.state.global_step == regular.state.global_step == 6  # two epochs of 3 windows
    a, b = regular.model.state_dict(), layerwise.model.state_dict()
    start = tiny_model().state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert any(not torch.equal(a[key], start[key]) for key in a)
    assert all(p.grad is None for p in layerwise.model.parameters())


def test_layerwise_trainer_resumes_exactly(tmp_path):
    optim = "lowrank_galore_adamw_layerwise"
    data = TokenData(n=20)
    full = Trainer(model=tiny_model(), args=layerwise_args(tmp_path / "full", optim), train_dataset=data)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    torch.load(checkpoint / "optimizer.pt", weights_only=True)
    resumed = Trainer(model=tiny_model(seed=5), args=layerwise_args(tmp_path / "resumed", optim), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_layerwise_trainer_clips_per_parameter_and_refuses_fp16(tmp_path):
    from types import SimpleNamespace

    args = training_args(tmp_path, optim="lowrank_galore_adamw_layerwise", optim_args="rank=4", max_grad_norm=0.5)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, tiny_model())
    assert cls()(tiny_model(), **kwargs).max_grad_norm == 0.5
    fp16 = SimpleNamespace(fp16=True, deepspeed=None, max_grad_norm=1.0, learning_rate=1e-3, weight_decay=0.0,
                           adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    with pytest.raises(ValueError, match=r"lowrank_galore_adamw_layerwise: fp16=True is not supported"):
        integ.optimizer_cls_and_kwargs("lowrank_galore_adamw_layerwise", args=fp16, rank=4)
    with pytest.raises(ValueError, match=r"'layerwise' is not available here: with the Trainer, name the layer-wise"):
        integ.parse_optim_args("galore_adamw", "rank=4,layerwise=true")


@needs_gloo
def test_layerwise_trainer_under_ddp_equals_the_regular_one(tmp_path):
    """Two gloo processes, the Trainer wrapping the model in DDP itself: the layer-wise
    optimizer attaches to it at its first forward and steps after each all-reduce; with
    accumulation (accelerate's no_sync on the first micro-batch of a window) and a short
    last window per epoch, it ends where the regular optimizer does."""
    import _trainer_ddp_worker as worker

    worker.spawn(worker.run, 2, str(tmp_path))
    record = torch.load(tmp_path / "results.pt", weights_only=True)
    regular, layerwise = record["lowrank_galore_adamw"], record["lowrank_galore_adamw_layerwise"]
    assert regular["wrapper"] == layerwise["wrapper"] == "DistributedDataParallel"
    assert regular["stepped_by_ddp"] == 0 and layerwise["stepped_by_ddp"] == len(list(tiny_model().parameters()))
    assert layerwise["grads_left"] == 0
    start = tiny_model().state_dict()
    for key, value in regular["params"].items():
        torch.testing.assert_close(layerwise["params"][key], value, rtol=0, atol=1e-6, msg=key)
    assert any(not torch.equal(v, start[k]) for k, v in regular["params"].items())


# --------------------------------------------------------------------------- one string
STOCK_SCRIPT = '''
from transformers import HfArgumentParser, TrainingArguments
(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
print("optim:", args.optim.value if hasattr(args.optim, "value") else args.optim)
'''


def test_launcher_runs_an_unmodified_script_with_our_names(tmp_path):
    """A stock script (no register() call) gets --optim lowrank_* through the launcher,
    transformers' 8-bit spelling and the layer-wise names included."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(STOCK_SCRIPT)
    for optim in ("lowrank_galore_adamw", "lowrank_galore_adamw_8bit", "lowrank_fira_adamw_layerwise"):
        command = [sys.executable, "-m", "lowrank_optim.hf", str(script), "--output_dir", str(tmp_path / "o"),
                   "--optim", optim, "--use_cpu", "true", "--report_to", "none"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"optim: {optim}" in done.stdout
    # without the launcher the same script fails in transformers' own check
    plain = subprocess.run([sys.executable, str(script), "--output_dir", str(tmp_path / "o"), "--optim",
                            "lowrank_galore_adamw", "--use_cpu", "true"], capture_output=True, text=True, timeout=120)
    assert plain.returncode != 0


def test_transformers_8bit_spelling_is_the_same_optimizer():
    from lowrank_optim.options import canonical_name

    assert canonical_name("lowrank_galore_adamw_8bit") == canonical_name("galore_adamw8bit") == "galore_adamw8bit"
    assert canonical_name("GaLore_AdamW") == "galore_adamw" and canonical_name("adamw") is None
    assert "lowrank_galore_adamw_8bit" in NAMES and "lowrank_qgalore_adamw_8bit_layerwise" in NAMES
    model = tiny_model()
    opt = lo.create_optimizer("lowrank_galore_adamw_8bit", model, target_modules=("attn",), rank=4)
    assert type(opt) is lo.GaLoreAdamW8bit


def test_factory_route_needs_the_training_arguments_or_an_explicit_lr(tmp_path):
    with pytest.raises(ValueError, match=r"needs args=training_args .* or an explicit lr="):
        integ.optimizer_cls_and_kwargs("galore_adamw", rank=4)
    _, kwargs = integ.optimizer_cls_and_kwargs("galore_adamw", rank=4, lr=3e-3)
    assert kwargs["hyperparameters"]["lr"] == 3e-3
    args = training_args(tmp_path, learning_rate=7e-3, weight_decay=0.2)
    factory, kwargs = integ.optimizer_cls_and_kwargs("galore_adamw", args=args, rank=4)
    opt = factory()(tiny_model(), **kwargs)
    assert opt.param_groups[0]["lr"] == 7e-3 and opt.param_groups[0]["weight_decay"] == 0.2
