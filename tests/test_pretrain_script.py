"""bench/pretrain.py end to end: a few steps of AdamW and GaLore on the tiny byte-level LLaMA."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import lowrank_optim

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "pretrain.py"


def bench_module(name: str):
    """One of the modules the script is made of (bench/ is a folder of scripts: on the path first)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


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


def test_corpus_is_deterministic_and_split_at_the_end(tmp_path):
    data = bench_module("corpus")
    first = data.load_corpus(max_bytes=50_000)
    second = data.load_corpus(max_bytes=50_000)
    assert torch.equal(first.train, second.train) and torch.equal(first.validation, second.validation)
    assert (len(first.train), len(first.validation)) == (45_000, 5_000)

    text = tmp_path / "corpus.txt"
    text.write_bytes(bytes(range(256)) * 4)
    corpus = data.load_corpus(str(text), max_bytes=1000, min_split=64)
    assert corpus.train.tolist() + corpus.validation.tolist() == list(text.read_bytes()[:1000])
    with pytest.raises(ValueError, match="too few"):
        data.load_corpus(str(text), max_bytes=100, min_split=64)


def test_unknown_optimizer_is_rejected(pretrain):
    with pytest.raises(SystemExit):
        pretrain.main(["--quick", "--optimizers", "adamw,not_an_optimizer"])


# ---------------------------------------------------------------------------- argument errors
#: (argv, what the one error line must say): each flag with a value the run cannot honour.
BAD_ARGS = [
    (["--clip-grad", "-1"], r"--clip-grad must be a finite number > 0, got -1\.0"),
    (["--clip-grad", "0"], r"--clip-grad .* got 0\.0"),
    (["--clip-grad", "nan"], r"--clip-grad .* got nan"),
    (["--warmup", "-3"], r"--warmup must be an integer >= 0, got -3"),
    (["--eval-every", "-1"], r"--eval-every .* got -1"),
    (["--validation-fraction", "1.5"], r"--validation-fraction must be a number in \(0, 1\), got 1\.5"),
    (["--validation-fraction", "0"], r"--validation-fraction .* got 0\.0"),
    (["--weight-decay", "-0.1"], r"--weight-decay .* got -0\.1"),
    (["--weight-decay", "nan"], r"--weight-decay .* got nan"),
    (["--corpus-bytes", "0"], r"--corpus-bytes must be an integer >= 1, got 0"),
    (["--lr", "-1"], r"--lr must be a finite number > 0, got -1\.0"),
    (["--lr", "inf"], r"--lr .* got inf"),
    (["--galore-lr", "0"], r"--galore-lr .* got 0\.0"),
    (["--scale", "nan"], r"--scale .* got nan"),
    (["--scale", "0"], r"--scale .* got 0\.0"),
    (["--steps", "0"], r"--steps must be an integer >= 1, got 0"),
    (["--batch-size", "0"], r"--batch-size .* got 0"),
    (["--seq-len", "-1"], r"--seq-len .* got -1"),
    (["--rank", "0"], r"--rank .* got 0"),
    (["--update-proj-gap", "0"], r"--update-proj-gap .* got 0"),
    (["--eval-batches", "0"], r"--eval-batches .* got 0"),
    (["--grad-accum", "0"], r"--grad-accum .* got 0"),
    (["--seed", str(2**64)], rf"--seed .* got {2**64}"),
    (["--save-every", "-1"], r"--save-every .* got -1"),
    (["--threads", "-2"], r"--threads .* got -2"),
    (["--vocab-size", "0", "--tokenized", "ids.pt"], r"--vocab-size .* got 0"),
    (["--vocab-size", "300"], r"--vocab-size 300 needs --tokenized"),
    (["--optimizers", "adamw,bogus"], r"--optimizers: unknown \['bogus'\]"),
    (["--optimizers", ","], r"--optimizers: unknown empty list"),
    (["--device", "cuda"], r"--device 'cuda': CUDA is not available on this machine"),
    (["--device", "gpu0"], r"--device 'gpu0': not a torch device"),
    (["--device", "meta"], r"--device 'meta': cannot train on meta"),
    # the optimizers' own messages, which name the class, the key and the value
    (["--opt-arg", "galore_adamw:rank=0"], r"galore_adamw: GaLoreAdamW: invalid rank=0 .*must be an integer >= 1"),
    (["--opt-arg", "galore_adamw:scale=nan"], r"galore_adamw: GaLoreAdamW: invalid scale=nan"),
    (["--opt-arg", "galore_adamw:density=1.5"], r"GaLoreAdamW: invalid density=1\.5"),
    (["--optimizers", "adamw", "--opt-arg", "lr=-1"], r"adamw: Invalid learning rate: -1\.0"),
    (["--optimizers", "adamw", "--opt-arg", "betas=(1.5,0.9)"], r"adamw: Invalid beta parameter at index 0: 1\.5"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[" ".join(argv) for argv, _ in BAD_ARGS])
def test_bad_values_end_in_one_usage_error(pretrain, capsys, monkeypatch, argv, message):
    # As on a machine without a GPU, so that --device cuda is refused everywhere.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_work(*_, **__):
        raise AssertionError("the arguments were accepted: data loading started")

    monkeypatch.setattr(pretrain, "load_data", no_work)
    with pytest.raises(SystemExit) as exited:
        pretrain.main(argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert "Traceback" not in err and out == ""


def test_every_numeric_flag_is_checked_and_tested():
    flags = bench_module("pretrain_args")
    numeric = {action.dest for action in flags.build_parser()._actions if action.type in (int, float)}
    assert numeric == set(flags.FLAG_CHECKS)
    tested = {argv[0] for argv, _ in BAD_ARGS}
    assert {"--" + dest.replace("_", "-") for dest in numeric} <= tested


def test_values_at_the_limits_are_accepted():
    args = bench_module("pretrain_args").parse_args(
        ["--clip-grad", "0.5", "--warmup", "0", "--eval-every", "0", "--validation-fraction", "0.5",
         "--weight-decay", "0", "--save-every", "0", "--threads", "0", "--seed", "-1", "--device", "cpu",
         "--tokenized", "ids.pt", "--vocab-size", "300", "--opt-arg", "galore_adamw:rank=4,scale=2.0"]
    )
    assert (args.clip_grad, args.warmup, args.validation_fraction, args.vocab_size) == (0.5, 0, 0.5, 300)
    assert args.opt_args["galore_adamw"] == {"rank": 4, "scale": 2.0}


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


# ---------------------------------------------------------------------------- the training loop's flags
#: A very short run of one optimizer, without progress bars: each test adds the flags it checks.
SHORT = ["--quick", "--steps", "4", "--no-progress", "--eval-batches", "1", "--batch-size", "4"]


def run_quiet(pretrain, argv: list[str]) -> list[dict]:
    with contextlib.redirect_stdout(io.StringIO()):
        return pretrain.main(argv)


def saved_weights(save_dir: Path, optimizer: str, step: int) -> dict[str, torch.Tensor]:
    path = save_dir / optimizer / f"step_{step:07d}.pt"
    return torch.load(path, weights_only=True)["model"]


def test_resume_equals_the_uninterrupted_run(pretrain, tmp_path):
    """6 steps straight == 3 steps, checkpoint, resume, 3 steps: the checkpoint falls in the
    middle of a GaLore refresh period (every 4 steps), so the basis and moments must come back."""
    run = SHORT + ["--steps", "6", "--optimizers", "galore_adamw", "--update-proj-gap", "4", "--save-every", "3"]
    run += ["--opt-arg", "galore_adamw:rank=8,scale=0.5"]
    run_quiet(pretrain, run + ["--save-dir", str(tmp_path / "straight")])
    halfway = tmp_path / "straight" / "galore_adamw" / "step_0000003.pt"
    resumed = run_quiet(pretrain, run + ["--save-dir", str(tmp_path / "resumed"), "--resume", str(halfway)])
    straight = saved_weights(tmp_path / "straight", "galore_adamw", 6)
    again = saved_weights(tmp_path / "resumed", "galore_adamw", 6)
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    assert not (tmp_path / "resumed" / "galore_adamw" / "step_0000003.pt").exists()  # it really resumed
    # the step-3 weights differ from the final ones, so the comparison above is not vacuous
    at_3 = saved_weights(tmp_path / "straight", "galore_adamw", 3)
    assert not all(torch.equal(at_3[k], straight[k]) for k in straight)
    assert math.isfinite(resumed[0]["val_loss"])


def test_resume_from_a_directory_takes_the_latest_checkpoint(pretrain, tmp_path):
    run_quiet(pretrain, SHORT + ["--optimizers", "adamw", "--save-dir", str(tmp_path), "--save-every", "3"])
    # every 3 steps and after the last (4th)
    assert sorted(p.name for p in (tmp_path / "adamw").iterdir()) == ["step_0000003.pt", "step_0000004.pt"]
    run_state = bench_module("run_state")
    assert run_state.find_checkpoint(str(tmp_path), "adamw").name == "step_0000004.pt"
    with pytest.raises(FileNotFoundError, match="galore_adamw"):
        run_state.find_checkpoint(str(tmp_path), "galore_adamw")
    adamw_checkpoint = str(tmp_path / "adamw" / "step_0000003.pt")
    with pytest.raises(ValueError, match="a checkpoint of adamw, not of galore_adamw"):
        run_quiet(pretrain, SHORT + ["--optimizers", "galore_adamw", "--resume", adamw_checkpoint])


def test_grad_accumulation_runs_and_changes_the_result(pretrain):
    plain = run_quiet(pretrain, SHORT + ["--optimizers", "galore_adamw"])[0]
    accumulated = run_quiet(pretrain, SHORT + ["--optimizers", "galore_adamw", "--grad-accum", "2"])[0]
    assert math.isfinite(accumulated["val_loss"]) and accumulated["val_loss"] != plain["val_loss"]


def test_grad_accumulation_averages_the_micro_batch_gradients(pretrain):
    """Two micro-batches of 2 give the gradient of one batch of 4 (up to float rounding)."""
    torch.manual_seed(0)
    model = bench_module("common").build_model("tiny", 16)
    batch = torch.randint(0, 256, (4, 16))
    pretrain.accumulate_gradients(model, list(batch.split(2)), bench_module("parallel").Distributed())
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    for a, p in zip(accumulated, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_clip_grad_and_bf16_run(pretrain):
    clipped = run_quiet(pretrain, SHORT + ["--optimizers", "adamw", "--clip-grad", "0.01"])[0]
    plain = run_quiet(pretrain, SHORT + ["--optimizers", "adamw"])[0]
    assert math.isfinite(clipped["val_loss"]) and clipped["val_loss"] != plain["val_loss"]
    bf16 = run_quiet(pretrain, SHORT + ["--dtype", "bf16"])
    for r in bf16:
        assert math.isfinite(r["val_loss"]) and r["val_loss"] < r["initial_val_loss"]
    # bf16 weights make bf16 moments: half AdamW's fp32 state (but for its fp32 step counters)
    assert 0.49 < bf16[0]["state_bytes"] / clipped["state_bytes"] < 0.51


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".bin"])
def test_tokenized_dataset_files(pretrain, tmp_path, suffix):
    import numpy as np

    ids = torch.randint(0, 1000, (5000,), generator=torch.Generator().manual_seed(0))
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".pt":
        torch.save(ids, path)
    elif suffix == ".npy":
        np.save(path, ids.numpy().astype(np.int32))
    else:
        ids.numpy().astype("<u2").tofile(path)
    data = bench_module("corpus")
    corpus = data.load_tokenized(str(path), 0.1, min_split=64)
    assert corpus.vocab_size == int(ids.max()) + 1
    assert [int(t) for t in corpus.train[:10]] == ids[:10].tolist() and len(corpus.validation) == 500
    assert data.windows(corpus.train, [3], 5).tolist() == [ids[3:8].tolist()]
    results = run_quiet(pretrain, SHORT + ["--optimizers", "galore_adamw", "--tokenized", str(path)])
    assert results[0]["parameters"] > 131_904  # a 1000-token vocabulary, not 256 bytes
    assert math.isfinite(results[0]["val_loss"])


def test_wandb_offline_writes_its_run(pretrain, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_quiet(pretrain, SHORT + ["--steps", "2", "--optimizers", "adamw", "--wandb"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((tmp_path / "wandb").iterdir())


def test_opt_args_are_typed_and_bad_keys_list_the_valid_ones(pretrain, capsys):
    flags = bench_module("pretrain_args")
    parsed = flags.parse_opt_args(
        ["galore_adamw:rank=64,scale=0.25,betas=(0.9,0.95)", "weight_decay=0.1"], ["adamw", "galore_adamw"]
    )
    assert parsed == {
        "adamw": {"weight_decay": 0.1},
        "galore_adamw": {"rank": 64, "scale": 0.25, "betas": (0.9, 0.95), "weight_decay": 0.1},
    }
    with pytest.raises(SystemExit):
        pretrain.main(SHORT + ["--opt-arg", "galore_adamw:rnk=3"])
    error = capsys.readouterr().err
    assert "galore_adamw: unknown option 'rnk'" in error and "rank, density, update_proj_gap" in error
    with pytest.raises(ValueError, match="needs 2 values"):
        flags.parse_opt_args(["betas=0.9"], ["adamw"])
    with pytest.raises(ValueError, match="not in --optimizers"):
        flags.parse_opt_args(["fira_adamw:rank=3"], ["adamw"])
    # the package's one syntax: the Trainer's tuple spelling works here too
    assert flags.parse_opt_args(["betas=0.8:0.9"], ["adamw"]) == {"adamw": {"betas": (0.8, 0.9)}}


def test_optimizer_names_are_the_package_table():
    """The profiler's peers and the Trainer's spellings are accepted, and canonicalised."""
    flags = bench_module("pretrain_args")
    args = flags.parse_args(SHORT + ["--optimizers", "AdamW,lowrank_galore_adamw,galore_adamw_8bit,adamw8bit,sgd"])
    assert args.optimizers == ["adamw", "galore_adamw", "galore_adamw8bit", "adamw8bit", "sgd"]
    model = bench_module("common").build_model("tiny")
    assert type(flags.make_optimizer("adamw8bit", model, args)).__name__ == "AdamW8bit"
    sgd = flags.make_optimizer("sgd", model, args)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9


def test_paper_shapes_include_7b():
    assert bench_module("common").MODEL_SHAPES["7b"][:4] == (4096, 11008, 32, 32)


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One torchrun-like process: the env vars torchrun would set, then the script's main."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("bench_pretrain_ddp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = SHORT + ["--steps", "3", "--optimizers", "galore_adamw", "--ddp", "--device", "cpu", "--grad-accum", "2"]
    with contextlib.redirect_stdout(io.StringIO()):
        results = module.main(argv + ["--save-dir", out_dir, "--save-every", "3"])
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def test_ddp_ranks_end_with_the_same_weights(pretrain, tmp_path):
    """Two gloo processes draw different batches yet, DDP averaging their gradients, end
    identical: their validation losses agree bit for bit and differ from one process's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text())[0] for r in (0, 1))
    assert rank0["val_loss"] == rank1["val_loss"]
    checkpoint = torch.load(tmp_path / "galore_adamw" / "step_0000003.pt", weights_only=True)
    assert len(checkpoint["rng"]) == 2  # both ranks' batch streams, written by rank 0 only
    single = run_quiet(pretrain, SHORT + ["--steps", "3", "--optimizers", "galore_adamw", "--grad-accum", "2"])[0]
    assert single["val_loss"] != rank0["val_loss"]


def _parallel_worker(rank: int, world_size: int, ports: list[int], out_dir: str) -> None:
    """One torchrun-like process running the script with ``--ddp``, then with ``--fsdp``
    (saving), then resuming that; each run on its own port, as three torchrun jobs would
    be (a rank reconnecting to the same port could reach the previous job's store)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("bench_pretrain_parallel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # proj_type=right: what "std" means under FSDP2 (the unsharded side), so the two agree.
    argv = SHORT + ["--steps", "3", "--optimizers", "galore_adamw", "--device", "cpu", "--grad-accum", "2",
                    "--opt-arg", "galore_adamw:proj_type=right"]
    checkpoints = ["--save-dir", out_dir, "--save-every", "2"]
    resume = ["--resume", str(Path(out_dir, "galore_adamw", "step_0000002.pt"))]
    # each main() joins and leaves the process group
    runs = (("ddp", ["--ddp"]), ("fsdp", ["--fsdp", *checkpoints]), ("resumed", ["--fsdp", *resume]))
    for (run, flags), port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        with contextlib.redirect_stdout(io.StringIO()):
            results = module.main(argv + flags)
        Path(out_dir, f"{run}{rank}.json").write_text(json.dumps(results))


def test_fsdp_trains_like_ddp_with_sharded_state_and_resumes(tmp_path):
    """Two gloo processes under --fsdp end where --ddp ends (same batches, same optimizer),
    each holds well under the optimizer state of a DDP rank, and a run resumed from the
    sharded (DCP) checkpoint of step 2 ends exactly where the uninterrupted one does."""
    import socket

    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:  # three distinct free ports, all held until each is known
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    torch.multiprocessing.spawn(_parallel_worker, args=(2, ports, str(tmp_path)), nprocs=2, join=True)
    ddp, fsdp0, fsdp1 = (json.loads((tmp_path / f"{name}.json").read_text())[0] for name in ("ddp0", "fsdp0", "fsdp1"))
    assert fsdp0["val_loss"] == fsdp1["val_loss"]
    assert math.isclose(fsdp0["val_loss"], ddp["val_loss"], rel_tol=1e-5)
    assert fsdp0["val_loss"] < fsdp0["initial_val_loss"]
    # the moments are split by rows; each rank also keeps the (replicated) r x n bases
    assert fsdp0["state_bytes"] < 0.7 * ddp["state_bytes"]
    assert fsdp0["state_bytes"] + fsdp1["state_bytes"] > ddp["state_bytes"]
    resumed = json.loads((tmp_path / "resumed0.json").read_text())[0]
    assert resumed["val_loss"] == fsdp0["val_loss"]
    assert (tmp_path / "galore_adamw" / "step_0000002.dcp").is_dir()  # the shards, beside the .pt
    assert "model" not in torch.load(tmp_path / "galore_adamw" / "step_0000002.pt", weights_only=True)
