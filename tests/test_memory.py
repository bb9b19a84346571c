"""lowrank_optim.memory: analytical estimate vs the paper, vs measured state, outputs, CLI."""
from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from lowrank_optim import memory as mem


# ----------------------------------------------------------------------------- paper

# Our reproduction of GaLore Table 2 (GiB), with the documented deviations (module docstring).
EXPECTED_ERR = {  # model: (full err %, galore err %)
    "60m": (-9.9, 8.6), "130m": (-1.4, 9.5), "350m": (-0.2, 6.0), "1b": (-4.1, 1.3),
}


def test_paper_table_within_5_percent_or_documented():
    rows = {r["model"]: r for r in mem.paper_table()}
    assert set(rows) == set(mem.PAPER_TABLE2)
    for model, (full_err, galore_err) in EXPECTED_ERR.items():
        r = rows[model]
        assert r["full_err_%"] == pytest.approx(full_err, abs=0.1)
        assert r["galore_err_%"] == pytest.approx(galore_err, abs=0.1)
    # within 5%: the full-rank column for 130M/350M/1B, GaLore at 1B
    for model in ("130m", "350m", "1b"):
        assert abs(rows[model]["full_err_%"]) < 5
    assert abs(rows["1b"]["galore_err_%"]) < 5
    # GB would be worse than GiB for the full-rank column overall
    gib = sum(abs(r["full_GiB"] / r["paper_full"] - 1) for r in rows.values())
    gb = sum(abs(r["full_GB"] / r["paper_full"] - 1) for r in rows.values())
    assert gib < gb
    # projecting the LM head brackets the paper's GaLore numbers from below
    head = {r["model"]: r for r in mem.paper_table(project_lm_head=True)}
    for model in ("130m", "350m", "1b"):
        assert -5 < head[model]["galore_err_%"] < 0


def test_llama_shapes_match_transformers_meta():
    transformers = pytest.importorskip("transformers")
    h, i, heads, layers, _ = mem.LLAMA_CONFIGS["60m"]
    config = transformers.LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=heads,
                                      num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=32000,
                                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    from_config = {s.name: (s.shape, s.projected) for s in mem.llama_param_specs("60m")}
    from_module = {s.name: (s.shape, s.projected) for s in mem.module_param_specs(model)}
    assert from_config == from_module
    a = mem.estimate("60m", "galore_adamw").totals
    b = mem.estimate(model, "galore_adamw", rank=128).totals
    assert a == b


def test_paper_formula_for_a_projected_matrix():
    # m <= n: basis m*r, moments 2*n*r (bf16)
    lin = nn.Sequential()
    lin.add_module("attn", nn.Linear(300, 100, bias=False))  # weight 100 x 300
    e = mem.estimate(lin, "galore_adamw", rank=16, dtype="bf16", grads=False)
    (row,) = e.rows
    assert row.projector == 100 * 16 * 2 and row.state == 2 * 300 * 16 * 2
    assert mem.estimate(lin, "adamw", dtype="bf16").rows[0].state == 2 * 100 * 300 * 2 + 4


# ----------------------------------------------------------------------------- measured == estimate


class Stack(nn.Module):
    """Projected linears of several shapes (both sides, 8-bit and fp32-fallback sizes) + dense params."""

    def __init__(self, shapes=((96, 64), (64, 160), (640, 48), (48, 48)), mlp=True, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(50, 48)
        self.attn = nn.ModuleList(nn.Linear(n, m, bias=False) for m, n in shapes)
        self.mlp = nn.Linear(48, 48) if mlp else nn.Identity()
        self.norm = nn.LayerNorm(48)
        self.to(dtype)

    def forward(self, x):
        return self.norm(self.mlp(x))


def _run(opt, model, steps=2):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


CASES = [
    ("adamw", {}, {}),
    ("galore_adamw", {"rank": 8}, {}),
    ("galore_adamw", {"rank": 8}, {"projector": "random"}),  # a seed, no basis
    ("galore_adamw8bit", {"rank": 8}, {}),
    ("dct_adamw", {"rank": 8}, {}),
    ("qgalore_adamw8bit", {"rank": 8}, {}),
    ("fira_adamw", {"rank": 8}, {}),
    ("natural_galore_adamw", {"rank": 8}, {}),
    ("gradnorm_lorp_adamw", {"rank": 8}, {}),
    ("gradnorm_lorp_adamw8bit", {"rank": 8}, {}),
    ("galore_adafactor", {"rank": 8}, {}),
    ("frugal_adamw", {"density": 0.25}, {}),
    ("frugal_adamw", {"density": 0.25}, {"projector": "columns"}),
    ("apollo_adamw", {"rank": 8}, {}),
    ("apollo_mini_adamw", {}, {}),  # no rank: the preset (1) in the optimizer and the estimate alike
]


@pytest.mark.parametrize("name,size,extra", CASES, ids=[c[0] + str(c[2].get("projector", "")) for c in CASES])
def test_measured_state_equals_estimate(name, size, extra):
    torch.manual_seed(0)
    model = Stack()
    opt = mem.build_optimizer(name, model, **size, **extra)
    _run(opt, model)
    named = list(model.named_parameters())
    measured = mem.state_bytes_per_param(opt, named)
    est = mem.estimate(model, name, dtype="fp32", **size, **extra)
    by_name = {r.name: r.optimizer for r in est.rows}
    assert measured == pytest.approx(by_name)
    assert mem.state_bytes(opt) == est.totals["optimizer"]  # the whole state, each storage once


BF16_CASES = ["adamw", "galore_adamw", "galore_adamw8bit", "qgalore_adamw8bit", "fira_adamw", "dct_adamw",
              "gradnorm_lorp_adamw", "galore_adafactor", "natural_galore_adamw", "apollo_adamw", "apollo_mini_adamw"]
UNSIZED = {"adamw", "apollo_mini_adamw"}  # dense, or sized by its preset rank


@pytest.mark.parametrize("name", BF16_CASES)
def test_measured_state_equals_estimate_bf16(name):
    torch.manual_seed(0)
    model = Stack(dtype=torch.bfloat16)
    size = {} if name in UNSIZED else {"rank": 8}
    opt = mem.build_optimizer(name, model, **size)
    _run(opt, model)
    measured = mem.state_bytes_per_param(opt, list(model.named_parameters()))
    est = mem.estimate(model, name, dtype="bf16", **size)
    assert measured == pytest.approx({r.name: r.optimizer for r in est.rows})


def test_measured_frugal_blocks_and_bnb_totals():
    # blocks: the total is exact when the projected matrices share one shape
    for steps in (1, 3):
        model = Stack(shapes=((64, 48),) * 4, mlp=False)
        opt = mem.build_optimizer("frugal_adamw", model, density=0.5, projector="blocks", update_proj_gap=1)
        _run(opt, model, steps)
        measured = sum(mem.state_bytes_per_param(opt, list(model.named_parameters())).values())
        est = mem.estimate(model, "frugal_adamw", density=0.5, projector="blocks", dtype="fp32")
        assert measured == est.totals["optimizer"]  # 2 of the 4 equal matrices active
    pytest.importorskip("bitsandbytes")
    model = Stack()
    opt = mem.build_optimizer("adamw8bit", model)
    _run(opt, model)
    measured = sum(mem.state_bytes_per_param(opt, list(model.named_parameters())).values())
    assert measured == mem.estimate(model, "adamw8bit", dtype="fp32").totals["optimizer"]


def test_int8_weights_counted_like_int8linear():
    from lowrank_optim import convert_linear_to_int8

    model = convert_linear_to_int8(Stack(), ("attn",))
    est = mem.estimate(model, "qgalore_adamw8bit", rank=8, dtype="fp32")
    int8_rows = [r for r in est.rows if r.name.startswith("attn.")]
    assert len(int8_rows) == 4 and all(r.projected for r in int8_rows)
    real = 0
    for name, module in model.named_modules():
        if name.startswith("attn."):
            real += sum(t.untyped_storage().nbytes() for t in (module.weight, module.weight_scales, module.weight_zeros))
    assert sum(r.weights for r in int8_rows) == real
    int8 = mem.estimate("60m", "qgalore_adamw8bit", int8_weights=True)
    bf16 = mem.estimate("60m", "qgalore_adamw8bit")
    for a, b in zip(int8.rows, bf16.rows):
        assert a.weights == (b.weights / 2 + 5 * -(-b.weights // 512) if a.projected else b.weights)
        assert (a.grads, a.state, a.projector) == (b.grads, b.state, b.projector)


@pytest.mark.parametrize("name,rank", [("galore_adamw", 8), ("apollo_adamw", 8), ("apollo_mini_adamw", None)])
def test_measure_tiny_llama_cpu(name, rank):
    pytest.importorskip("transformers")
    res = mem.measure(name, steps=2, rank=rank)
    est = mem.estimate(mem.tiny_llama(), name, rank=rank, dtype="fp32")
    assert res["state_total"] == est.totals["optimizer"]
    assert 0 < res["state_bytes_per_param"] < 8
    assert res["peaks"] == {} or torch.cuda.is_available()


def test_apollo_projected_matrix_is_two_moments_and_the_limiter():
    lin = nn.Sequential()
    lin.add_module("attn", nn.Linear(300, 100, bias=False))  # weight 100 x 300: moments r x 300
    lin.add_module("mlp", nn.Linear(100, 300, bias=False))  # weight 300 x 100: moments 300 x r
    for name, r in (("apollo_adamw", 16), ("apollo_mini_adamw", 1)):
        rows = mem.estimate(lin, name, rank=None if name == "apollo_mini_adamw" else r, dtype="bf16").rows
        assert [(row.state, row.projector) for row in rows] == [(2 * 300 * r * 2 + 4, 0)] * 2


def test_apollo_mini_state_is_sgd_like():
    """APOLLO-Mini's "SGD-like memory", measured: state <= 1.05x SGD with momentum's, once
    every 2-D weight a Linear holds is projected (attention, MLP and the LM head).  The
    embedding is no Linear and stays dense (AdamW, 2 numbers per element), which the ratio
    absorbs.  Left out, the LM head's dense moments would break it when the vocabulary
    dominates the parameters, as at LLaMA-60M; vocab 2048 on hidden 64 makes the tiny
    model's embedding + head 73% of its parameters, like 60M's 56%."""
    pytest.importorskip("transformers")
    everything = ("attn", "mlp", "lm_head")
    numel = sum(p.numel() for p in mem.tiny_llama(vocab=2048).parameters())
    assert mem.build_optimizer("sgd", nn.Linear(2, 2)).defaults["momentum"] == 0.9
    measured = {}
    cases = (("sgd", everything), ("apollo_mini_adamw", everything), ("apollo_mini_adamw", ("attn", "mlp")))
    for name, targets in cases:
        model = mem.tiny_llama(vocab=2048)
        res = mem.measure(name, model=model, steps=3, rank=None, target_modules=targets)
        est = mem.estimate(model, name, dtype="fp32", target_modules=targets)
        assert res["state_total"] == est.totals["optimizer"]
        measured[name, targets] = res["state_total"]
    assert measured["sgd", everything] == 4 * numel  # one fp32 momentum buffer per parameter
    assert measured["apollo_mini_adamw", everything] <= 1.05 * measured["sgd", everything]
    assert measured["apollo_mini_adamw", ("attn", "mlp")] > 1.05 * measured["sgd", everything]
    # LLaMA-60M (bf16, untied head), analytically: 0.57x SGD with the head projected, 1.13x without
    sgd_60m = mem.estimate("60m", "sgd").totals["state"]
    mini = mem.estimate("60m", "apollo_mini_adamw", target_modules=everything).totals
    assert mini["projector"] == 0 and mini["state"] / sgd_60m == pytest.approx(0.567, abs=0.001)
    assert mem.estimate("60m", "apollo_mini_adamw").totals["state"] / sgd_60m == pytest.approx(1.131, abs=0.001)


# ----------------------------------------------------------------------------- outputs


def test_rows_sum_to_totals_and_per_layer():
    for name in ("adamw", "galore_adamw8bit", "qgalore_adamw8bit"):
        e = mem.estimate("130m", name)
        t = e.totals
        for k in mem.FIELDS:
            assert sum(getattr(r, k) for r in e.rows) == t[k]
            assert sum(g[k] for g in e.per_layer().values()) == pytest.approx(t[k])
        assert len([k for k in e.per_layer() if ".layers." in k]) == 12


def test_outputs_parse():
    es = [mem.estimate("60m", o) for o in ("adamw", "galore_adamw", "frugal_adamw")]
    data = json.loads(mem.render(es, "json"))
    assert [d["optimizer"] for d in data] == ["adamw", "galore_adamw", "frugal_adamw"]
    assert data[1]["totals"]["total"] == es[1].totals["total"]
    rows = list(csv.DictReader(io.StringIO(mem.render(es, "csv"))))
    assert float(rows[0]["state"]) == es[0].totals["state"]
    per_layer = list(csv.DictReader(io.StringIO(mem.render(es, "csv", per_layer=True))))
    assert len(per_layer) == 3 * len(es[0].per_layer())
    md = mem.render(es, "markdown", per_layer=True).splitlines()
    assert md[0].startswith("| optimizer") and set(md[1]) <= set("|-:")
    assert all(line.count("|") == md[0].count("|") for line in md)
    assert "galore_adamw" in mem.render(es, "table")
    paper_md = mem.render_paper(mem.paper_table(), "markdown")
    assert paper_md.count("\n") == 5


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "mem.png"
    mem.plot([mem.estimate("60m", o) for o in ("adamw", "galore_adamw")], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs():
    with pytest.raises(ValueError, match="galore_adamw"):
        mem.estimate("60m", "nope")
    with pytest.raises(ValueError, match="60m"):
        mem.estimate("3b", "adamw")
    with pytest.raises(ValueError, match="bf16"):
        mem.estimate("60m", "adamw", dtype="int3")
    with pytest.raises(ValueError, match="valid ones"):
        mem.render([mem.estimate("60m", "adamw")], "xml")


def test_cli(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert mem.main(["--model", "1b", "--optimizers", "adamw,galore_adamw,qgalore_adamw8bit", "--rank", "512",
                     "--dtype", "bf16", "--format", "markdown", "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "qgalore_adamw8bit" in text and out.exists()
    assert mem.main(["--paper", "--format", "markdown"]) == 0
    assert "1b" in capsys.readouterr().out
    assert mem.main(["--measure", "--optimizers", "adamw,galore_adamw", "--steps", "1"]) == 0
    assert "galore_adamw" in capsys.readouterr().out


def test_cli_subprocess():
    proc = subprocess.run([sys.executable, "-m", "lowrank_optim.memory", "--paper", "--format", "csv"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 4 and "GiB" in proc.stderr
    assert float(rows[3]["paper_galore"]) == 4.38


#: (argv, what the one error line must say); MISSING is a folder that does not exist.
MISSING = "{missing}"
BAD_ARGS = [
    (["--rank", "0"], r"--rank must be an integer >= 1, got 0"),
    (["--rank", "-5"], r"--rank .* got -5"),
    (["--density", "2"], r"--density must be a fraction in \(0, 1\], got 2\.0"),
    (["--density", "0"], r"--density .* got 0\.0"),
    (["--density", "nan"], r"--density .* got nan"),
    (["--steps", "0"], r"--steps must be an integer >= 1, got 0"),
    (["--optimizers", ""], r"--optimizers '': name at least one of adamw"),
    (["--optimizers", " , "], r"--optimizers ' , ': name at least one"),
    (["--optimizers", "adamw,bogus"], r"--optimizers: unknown optimizer 'bogus'; valid ones: adamw"),
    (["--plot", f"{MISSING}/out.png"], r"--plot '.*/missing/out\.png': folder '.*/missing' does not exist"),
    (["--measure", "--device", "cuda"], r"--device 'cuda': CUDA is not available on this machine"),
    (["--measure", "--device", "gpu0"], r"--device 'gpu0': not a torch device"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[" ".join(argv) for argv, _ in BAD_ARGS])
def test_cli_bad_values_end_in_one_usage_error(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device cuda refused on any machine
    argv = [a.replace(MISSING, str(tmp_path / "missing")) for a in argv]
    with pytest.raises(SystemExit) as exited:
        mem.main(argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert "Traceback" not in err and out == ""  # refused before any table was printed
    assert not (tmp_path / "missing").exists()


def test_wandb_table_disabled_mode(monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    mem.log_wandb([mem.estimate("60m", "adamw"), mem.estimate("60m", "galore_adamw")])
    if wandb.run is not None:
        wandb.finish()


@pytest.mark.parametrize("name,extra", [("gradnorm_lorp_adamw8bit", {}), ("galore_adamw", {"projector": "rsvd"}),
                                        ("frugal_adamw", {"projector": "rows"})])
def test_measured_large_rows_and_other_projectors(name, extra):
    # m >= min_8bit_size: GradNorm-LoRP's magnitude moments go 8-bit
    model = Stack(shapes=((4100, 8), (24, 40)))
    size = {"density": 0.25} if name == "frugal_adamw" else {"rank": 4}
    opt = mem.build_optimizer(name, model, **size, **extra)
    _run(opt, model)
    measured = mem.state_bytes_per_param(opt, list(model.named_parameters()))
    est = mem.estimate(model, name, dtype="fp32", **size, **extra)
    assert measured == pytest.approx({r.name: r.optimizer for r in est.rows})


def test_state_bytes_counts_what_a_tensor_subclass_wraps():
    """torchao keeps 8-bit moments as wrapper subclasses whose own storage is a placeholder:
    the count must reach the codes, scales and code book inside."""
    torchao_optim = pytest.importorskip("torchao.optim")
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = torchao_optim.AdamW8bit([p], block_size=256)
    p.grad = torch.randn_like(p)
    opt.step()
    inner = [
        getattr(t, name)
        for t in opt.state[p].values()
        if hasattr(t, "__tensor_flatten__")
        for name in t.__tensor_flatten__()[0]
    ]
    assert len(inner) >= 4  # two moments, each with codes and scales at least
    expected = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inner}.values())
    step = opt.state[p].get("step")
    expected += step.untyped_storage().nbytes() if isinstance(step, torch.Tensor) else 0
    assert mem.state_bytes(opt) == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_process_peak_sees_a_transient_allocation():
    baseline = mem.start_process_peak()
    assert baseline is not None
    transient = torch.ones(16 * 2**20)  # 64 MiB, touched, then freed
    del transient
    assert mem.process_peak_since(baseline) >= 60 * 2**20
    assert mem.process_peak_since(None) is None
