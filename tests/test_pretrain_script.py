"""bench/pretrain.py end to end: a few steps of AdamW and GaLore on the tiny byte-level LLaMA."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import lowrank_optim

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "pretrain.py"


@pytest.fixture(scope="module")
def pretrain():
    """The script as a module (bench/ is not a package, so load it from its path)."""
    spec = importlib.util.spec_from_file_location("bench_pretrain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def quick_run(pretrain, tmp_path_factory):
    """One quick comparison shared by the tests below (its stdout, results and JSON)."""
    out = tmp_path_factory.mktemp("pretrain") / "results.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results = pretrain.main(["--quick", "--steps", "8", "--no-progress", "--seed", "3", "--out", str(out)])
    return results, stdout.getvalue(), json.loads(out.read_text())


def test_both_default_optimizers_train(quick_run):
    results, _, _ = quick_run
    assert [r["optimizer"] for r in results] == ["adamw", "galore_adamw"]
    for r in results:
        assert math.isfinite(r["val_loss"]) and math.isfinite(r["initial_val_loss"])
        # ln(256) ~ 5.55 is the loss of a uniform guess; a few steps must already beat the start.
        assert r["val_loss"] < r["initial_val_loss"] - 0.1, r
        assert r["optimizer_step_ms"] > 0 and r["train_step_ms"] >= r["optimizer_step_ms"]


def test_same_initial_model_for_every_optimizer(quick_run):
    results, _, _ = quick_run
    adamw, galore = results
    assert adamw["initial_val_loss"] == galore["initial_val_loss"]
    assert adamw["parameters"] == galore["parameters"]


def test_galore_state_is_smaller_than_adamw(quick_run):
    results, _, _ = quick_run
    adamw, galore = results
    assert adamw["state_ratio_vs_adamw"] == 1.0
    assert 0 < galore["state_bytes"] < adamw["state_bytes"]
    assert galore["state_ratio_vs_adamw"] == pytest.approx(galore["state_bytes"] / adamw["state_bytes"])


def test_table_is_printed_and_json_written(pretrain, quick_run):
    results, stdout, saved = quick_run
    header = next(line for line in stdout.splitlines() if line.startswith("optimizer "))
    assert [cell.strip() for cell in header.split("|")] == list(pretrain.TABLE_HEADER)
    table_rows = [line for line in stdout.splitlines() if line.startswith(("adamw ", "galore_adamw "))]
    assert len(table_rows) == 2
    assert saved["results"] == json.loads(json.dumps(results))
    assert saved["args"]["steps"] == 8  # the explicit flag beats --quick's default


def test_state_bytes_counts_nested_projector_state(pretrain):
    weight = torch.nn.Parameter(torch.randn(8, 6))
    optimizer = lowrank_optim.GaLoreAdamW([{"params": [weight], "rank": 2}])
    weight.grad = torch.randn(8, 6)
    optimizer.step()
    # m >= n: right basis Q (2 x 6) in state["projector"], two 8 x 2 moments, all fp32.
    assert pretrain.state_bytes(optimizer) == 4 * (2 * 6 + 2 * 8 * 2)


def test_corpus_is_deterministic_and_split_at_the_end(pretrain, tmp_path):
    first = pretrain.load_corpus(max_bytes=50_000)
    second = pretrain.load_corpus(max_bytes=50_000)
    assert torch.equal(first.train, second.train) and torch.equal(first.validation, second.validation)
    assert (len(first.train), len(first.validation)) == (45_000, 5_000)

    text = tmp_path / "corpus.txt"
    text.write_bytes(bytes(range(256)) * 4)
    corpus = pretrain.load_corpus(str(text), max_bytes=1000, min_split=64)
    assert corpus.train.tolist() + corpus.validation.tolist() == list(text.read_bytes()[:1000])
    with pytest.raises(ValueError, match="too few"):
        pretrain.load_corpus(str(text), max_bytes=100, min_split=64)


def test_unknown_optimizer_is_rejected(pretrain):
    with pytest.raises(SystemExit):
        pretrain.main(["--quick", "--optimizers", "adamw,not_an_optimizer"])


def test_readme_main_command_runs_in_short_form():
    """The README's first command ends in a run of bench/pretrain.py: run that, shortened."""
    import re
    import subprocess

    readme = (SCRIPT.parents[1] / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    main_command = commands[0]
    assert main_command.startswith("python3 -m venv .venv") and "pip install torch==2.13.0" in main_command
    script_call = main_command.rsplit("&& ", 1)[1].split()
    assert script_call[:2] == ["python", "bench/pretrain.py"]
    done = subprocess.run(
        [sys.executable, *script_call[1:], "--quick", "--steps", "4", "--no-progress"],
        cwd=SCRIPT.parents[1], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("adamw ", "galore_adamw "))]
    assert len(rows) == 2
