"""Smoke tests of bench/compare.py and bench/convergence.py (their --quick modes) and of
their pure helpers.  No timing is asserted: only that every contender is accounted for,
that the numbers are sane, and that our state is the analytical minimum."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = str(Path(__file__).resolve().parents[1] / "bench")


def bench_script(name: str):
    """Import ``bench/<name>.py``.  The path goes in before each import: importing the peer
    packages resets ``sys.path`` in this environment."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return pytest.importorskip(name)


compare = bench_script("compare")
convergence = bench_script("convergence")
common = bench_script("common")

QUICK_COMPARE = [
    "ours GaLoreAdamW svd",
    "ours FiraAdamW",
    "ours ApolloAdamW",
    "ours ApolloAdamW keep",
    "ours ApolloAdamW fp32 sketch",
    "ours ApolloMiniAdamW",
    "galore_torch GaLoreAdamW",
    "fira FiraAdamW",
    "apollo_torch APOLLOAdamW",
    "apollo_torch APOLLOAdamW mini",
    "q_galore_torch QGaLoreAdamW8bit",
    "torch AdamW foreach",
]


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    raw = compare.main(["--quick", "--no-progress", "--threads", "1", "--out", str(out), "--only", ",".join(QUICK_COMPARE)])
    return raw, out


def test_compare_accounts_for_every_contender(compare_run):
    raw, out = compare_run
    measured = {r["label"] for r in raw["rows"]}
    failed = {f["label"] for f in raw["failed"]}
    assert measured | failed == set(QUICK_COMPARE)  # each one either ran or says why not
    assert {"ours GaLoreAdamW svd", "torch AdamW foreach"} <= measured
    assert all(f["reason"] for f in raw["failed"])
    assert json.loads((out / "compare_quick.json").read_text())["rows"] == raw["rows"]
    table = (out / "compare_quick.md").read_text()
    assert all(label in table for label in QUICK_COMPARE)


def test_compare_numbers_are_sane(compare_run):
    raw, _ = compare_run
    rows = {r["label"]: r for r in raw["rows"]}
    for r in rows.values():
        assert r["state_bytes"] > 0 and math.isfinite(r["amortized_s"]) and r["amortized_s"] > 0
        assert len(raw["step_times_s"][r["label"]]) == 2 * raw["update_proj_gap"]  # 2 timed periods of T
        if sys.platform.startswith("linux"):  # CPU peak: the process's resident high-water mark
            assert r["peak_bytes"] is not None and r["peak_bytes"] >= 0
    ours = rows["ours GaLoreAdamW svd"]
    assert ours["state_bytes"] == ours["minimum_bytes"]  # no hidden copies: exactly basis + 2 moments
    assert ours["peer"] == "galore_torch GaLoreAdamW"
    assert rows["torch AdamW foreach"]["refresh_s"] is None  # dense: no refresh step
    if "galore_torch GaLoreAdamW" in rows:
        # galore_torch keeps each basis as a slice of the full SVD factor: more than the minimum
        assert rows["galore_torch GaLoreAdamW"]["state_bytes"] > ours["minimum_bytes"]
        assert ours["state_vs_peer"] == pytest.approx(ours["state_bytes"] / rows["galore_torch GaLoreAdamW"]["state_bytes"])


def test_compare_apollo_against_apollo_torch(compare_run):
    raw, _ = compare_run
    rows = {r["label"]: r for r in raw["rows"]}
    pairs = (("ours ApolloAdamW", "apollo_torch APOLLOAdamW"), ("ours ApolloMiniAdamW", "apollo_torch APOLLOAdamW mini"))
    for ours, peer in pairs:
        assert rows[ours]["peer"] == peer
        assert rows[ours]["state_bytes"] == rows[ours]["minimum_bytes"]  # two moments + the limiter, no basis
        if peer in rows:  # apollo_torch also keeps its random matrix: above the minimum
            assert rows[peer]["minimum_bytes"] == rows[ours]["minimum_bytes"]
            assert rows[peer]["state_bytes"] > rows[peer]["minimum_bytes"]
    kept = rows["ours ApolloAdamW keep"]  # the same plus the kept sketches (r x n floats per matrix)
    assert kept["minimum_bytes"] == rows["ours ApolloAdamW"]["minimum_bytes"] < kept["state_bytes"]
    # the product's precision changes no state
    assert rows["ours ApolloAdamW fp32 sketch"]["state_bytes"] == rows["ours ApolloAdamW"]["state_bytes"]
    # Mini's moments are rank 1: far below APOLLO's rank-r ones on the same stack
    assert rows["ours ApolloMiniAdamW"]["state_bytes"] < rows["ours ApolloAdamW"]["state_bytes"] / 8


def test_every_optimizer_is_a_contender_with_a_listed_peer():
    import lowrank_optim

    cs = compare.contenders(rank=8, gap=3)
    labels = [c.label for c in cs]
    assert len(labels) == len(set(labels))
    assert all(c.peer in labels for c in cs if c.peer)  # a ratio against a row that exists
    ours = {c.method for c in cs if c.package == "lowrank_optim"}
    assert ours == set(lowrank_optim.available_optimizers())
    by_label = {c.label: c for c in cs}
    assert by_label["ours ApolloAdamW"].peer == "apollo_torch APOLLOAdamW"
    assert by_label["ours ApolloMiniAdamW"].peer == "apollo_torch APOLLOAdamW mini"
    assert by_label["ours ApolloMiniAdamW"].rank == by_label["apollo_torch APOLLOAdamW mini"].rank == 1


def test_missing_peer_is_listed_with_its_error():
    stack = compare.stack_with_grads("tiny", 1, torch.device("cpu"))
    c = compare.Contender("nowhere Adam", lambda s: None, "no_such_package_for_lowrank_tests")
    assert compare.first_period(c, stack, 2, 8, torch.device("cpu"), lambda: None) is None
    assert c.error.startswith("not importable: ModuleNotFoundError")

    def crash(stack):
        raise RuntimeError("boom")

    c = compare.Contender("crashing Adam", crash, "torch")
    assert compare.first_period(c, stack, 2, 8, torch.device("cpu"), lambda: None) is None
    assert c.error == "RuntimeError: boom"


def test_summary_splits_refresh_from_steady_steps():
    c = compare.Contender("x", lambda s: None, "torch", step_times=[5.0, 1.0, 1.2, 0.9, 6.0, 1.1])
    s = compare.summary(c, gap=3)
    assert s["refresh"] == pytest.approx(5.5)  # median of each period's slowest step
    assert s["steady"] == pytest.approx(1.05)  # median of the others
    assert s["amortized"] == pytest.approx((5.5 + 2 * 1.05) / 3)
    assert s["period_mean"] == pytest.approx((7.2 / 3 + 8.0 / 3) / 2)
    dense = compare.Contender("d", lambda s: None, "torch", low_rank=False, step_times=[1.0, 2.0, 3.0])
    assert compare.summary(dense, gap=3)["refresh"] is None
    assert compare.summary(dense, gap=3)["amortized"] == 2.0


def test_convergence_plan_shares_runs_and_clips_ranks():
    runs = convergence.plan(["lr", "method", "rank"], default_rank=64, ranks=(4, 64, 512), max_rank=256)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    galore64 = next(r for r in runs if r.optimizer == "galore_adamw" and r.rank == 64 and r.lr == convergence.LOW_RANK_LR)
    assert set(galore64.sweeps) == {"lr", "rank"}  # trained once, shown in both sweeps
    assert {r.rank for r in runs if "rank" in r.sweeps and r.optimizer == "dct_adamw"} == {4, 64, 256}
    frugal = [r for r in runs if r.optimizer == "frugal_adamw"]
    assert all(r.lr == convergence.ADAMW_LR and r.scale == 1.0 for r in frugal)
    assert {r.optimizer for r in runs} == {"adamw", *convergence.METHODS, *convergence.LR_GRID}
    # APOLLO at its paper's settings (scale 1; Mini rank 1, scale sqrt 128) over its own lr grid
    apollo = {(r.optimizer, r.lr): r for r in runs if r.optimizer.startswith("apollo")}
    assert set(apollo) == {(o, lr) for o in ("apollo_adamw", "apollo_mini_adamw") for lr in convergence.LR_GRID[o]}
    for (optimizer, _), run in apollo.items():
        expected = (64, 1.0) if optimizer == "apollo_adamw" else (1, pytest.approx(math.sqrt(128)))
        assert (run.rank, run.scale) == expected
    assert len(convergence.plan(["lr", "method", "rank"], 64, convergence.RANKS, 256)) == 35


def test_convergence_quick_trains_saves_and_resumes(tmp_path, monkeypatch):
    argv = ["--quick", "--sweeps", "lr,method", "--no-progress", "--no-plots", "--out", str(tmp_path)]
    raw = convergence.main(argv)
    rows = {(r["optimizer"], r["lr"]): r for r in raw["rows"]}
    assert {opt for opt, _ in rows} == {"adamw", *convergence.METHODS, *convergence.LR_GRID}
    assert len(rows) == sum(len(g) for g in convergence.LR_GRID.values()) + len(convergence.METHODS)
    for r in rows.values():
        assert math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < r["initial_val_loss"] + 1.0
        assert r["state_bytes"] > 0 and r["eval_history"][-1][0] == convergence.QUICK["steps"]
    adamw = rows[("adamw", convergence.ADAMW_LR)]
    galore = rows[("galore_adamw", convergence.LOW_RANK_LR)]
    assert galore["state_bytes"] < adamw["state_bytes"]
    report = (tmp_path / "convergence_quick" / "convergence_lr_method.md").read_text()
    assert "GaLoreAdamW" in report and "target within +3%" in report
    assert "ApolloMiniAdamW (best lr" in report and "x GaLoreAdamW's best loss" in report
    mini, apollo = rows[("apollo_mini_adamw", convergence.LOW_RANK_LR)], rows[("apollo_adamw", convergence.LOW_RANK_LR)]
    assert mini["state_bytes"] < apollo["state_bytes"] <= galore["state_bytes"]  # no basis; rank 1

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(convergence.pretrain, "train_one", no_training)
    again = convergence.main(argv)  # every run is on disk: loaded, not retrained
    assert [r["val_loss"] for r in again["rows"]] == [r["val_loss"] for r in raw["rows"]]


def test_rank_sweep_plot(tmp_path):
    pytest.importorskip("matplotlib")
    raw = convergence.main(["--quick", "--sweeps", "rank", "--no-progress", "--out", str(tmp_path)])
    ranks = {(r["optimizer"], r["rank"]) for r in raw["rows"]}
    assert {(m, r) for m in convergence.RANK_METHODS for r in convergence.QUICK_RANKS} <= ranks
    assert (tmp_path / "convergence_quick" / "rank_memory.png").stat().st_size > 1000


# ---------------------------------------------------------------------------- --preset long
def test_long_plan_seeds_lrs_and_projectors():
    runs = convergence.plan_long(16, seeds=range(3), extra_seeds=range(3, 5))
    assert len({r.name for r in runs}) == len(runs)
    seeds: dict[tuple, set] = {}
    for r in runs:
        if "long" in r.sweeps:
            seeds.setdefault(r.config, set()).add(r.seed)
    for lr in convergence.LONG_ADAMW_GRID:  # AdamW's whole grid on every seed: the bracket has error bars
        assert seeds[("adamw", None, lr, 16, 0.25, None)] == {0, 1, 2}
    assert len(seeds) == len(convergence.LONG_ADAMW_GRID) + len(convergence.LONG_CONTENDERS)
    for optimizer, projector, lr, variant in convergence.LONG_CONTENDERS:
        config = next(c for c in seeds if c[:3] == (optimizer, projector, lr) and c[-1] == variant)
        assert seeds[config] == ({0, 1, 2, 3, 4} if optimizer in convergence.DECISION else {0, 1, 2})
        checks = {r.lr for r in runs if "long-lr" in r.sweeps and r.config[:2] == (optimizer, projector) and r.variant == variant}
        assert len(checks) == 2 and min(checks) < lr < max(checks)  # one ladder step (about 3x) either side
        assert all(2.9 < max(x / lr, lr / x) < 3.4 for x in checks)
        assert all(r.seed == 0 for r in runs if "long-lr" in r.sweeps)
    # the decision pairs: svd and rsvd at the same lr, and the projector reaches the optimizer
    pairs = {(o, p) for o, p, _, _ in convergence.LONG_CONTENDERS if o in convergence.DECISION}
    assert pairs == {(o, p) for o in convergence.DECISION for p in ("svd", "rsvd")}
    mini = next(r for r in runs if r.optimizer == "apollo_mini_adamw")
    assert mini.rank == 1 and mini.scale == pytest.approx(math.sqrt(128))
    args = convergence.parse_args(["--preset", "long"])
    settings = convergence.long_settings(args)
    rsvd = next(r for r in runs if r.projector == "rsvd" and r.seed == 2)
    parsed = convergence.pretrain_args(rsvd, settings, args)
    assert parsed.opt_args[rsvd.optimizer]["projector"] == "rsvd" and parsed.seed == 2
    # the variants: their own run names, their flags reaching the optimizer and the model's targets
    fp32 = next(r for r in runs if r.variant == "fp32-sketch" and r.seed == 1)
    assert fp32.optimizer == "apollo_adamw" and "_fp32-sketch_" in fp32.name
    parsed = convergence.pretrain_args(fp32, settings, args)
    assert parsed.opt_args["apollo_adamw"]["projector_args"] == {"product_dtype": "gradient"}
    assert parsed.target_modules == "attn,mlp"
    head = next(r for r in runs if r.variant == "head" and r.seed == 0)
    assert convergence.pretrain_args(head, settings, args).target_modules == "attn,mlp,lm_head"
    # the GPU command's filter: AdamW's grid, GaLore and Fira (their bf16-products variants too),
    # not the other "..._adamw_" methods
    chosen = convergence.select(runs, "^adamw_,galore_adamw_lr,fira_adamw_lr")
    assert {r.optimizer for r in chosen} == {"adamw", "galore_adamw", "fira_adamw"} and len(chosen) == 51
    # the first seed's runs (lr checks included) come before any other seed's
    first_other = next(i for i, r in enumerate(runs) if r.seed != 0)
    assert all(r.seed == 0 for r in runs[:first_other]) and all(r.seed != 0 for r in runs[first_other:])


def test_long_settings_reach_15_tokens_per_parameter():
    settings = convergence.long_settings(convergence.parse_args(["--preset", "long"]))
    parameters = common.count_parameters(common.build_model(settings["model"]))
    assert settings["steps"] * settings["batch_size"] * settings["seq_len"] / parameters >= 15
    assert settings["warmup"] == settings["steps"] // 10  # the papers' 10% warmup
    assert settings["rank"] * 4 == common.MODEL_SHAPES[settings["model"]].hidden_size
    gpu = convergence.long_settings(convergence.parse_args(["--preset", "long", "--model", "60m", "--steps", "500"]))
    assert (gpu["warmup"], gpu["rank"]) == (50, 128)


def _rows(optimizer, projector, lr, losses, sweeps=("long",), variant=None):
    return [{"optimizer": optimizer, "projector": projector, "lr": lr, "rank": 16, "seed": seed, "val_loss": loss,
             "config": (optimizer, projector, lr, 16, 0.25, variant), "variant": variant, "sweeps": sweeps, "state_bytes": 100, "parameters": 10,
             "train_step_ms": 1.0, "eval_history": [(0, 5.5), (10, loss)]}
            for seed, loss in enumerate(losses)]  # fmt: skip


def test_long_statistics_bracket_and_projector_verdicts():
    rows = (_rows("adamw", None, 1e-3, [2.0, 2.2, 2.4]) + _rows("adamw", None, 3e-3, [1.9, 2.0, 2.1])
            + _rows("adamw", None, 1e-2, [2.5, 2.6, 2.7]))  # fmt: skip
    rows += _rows("galore_adamw", "svd", 1e-2, [1.0, 1.1, 1.2]) + _rows("galore_adamw", "rsvd", 1e-2, [1.01, 1.11, 1.19])
    rows += _rows("fira_adamw", "svd", 1e-2, [1.0, 1.01, 1.02]) + _rows("fira_adamw", "rsvd", 1e-2, [1.1, 1.11, 1.12])
    # a variant of the rsvd row does not take the rsvd row's place in the svd/rsvd verdict
    rows += _rows("galore_adamw", "rsvd", 1e-2, [5.0, 5.0, 5.1], variant="bf16-products")
    groups = convergence.seed_groups(rows)
    adamw = convergence.best_adamw(groups)
    assert adamw["lr"] == 3e-3 and adamw["mean"] == pytest.approx(2.0) and adamw["std"] == pytest.approx(0.1)
    assert (adamw["min"], adamw["max"], adamw["seeds"]) == (1.9, 2.1, [0, 1, 2])
    assert "**interior**" in convergence.adamw_bracket(groups)
    edge = [g for g in groups if not (g["optimizer"] == "adamw" and g["lr"] == 1e-2)]
    assert "grid's edge" in convergence.adamw_bracket([g for g in edge if not (g["optimizer"] == "adamw" and g["lr"] == 1e-3)])
    rows += _rows("apollo_adamw", None, 3e-2, [1.5, 1.6, 1.7]) + _rows("apollo_adamw", None, 3e-2, [1.5, 1.61, 1.69], variant="fp32-sketch")
    # a variant at its own lr is paired with its method's default at the default's lr
    rows += _rows("apollo_mini_adamw", None, 3e-2, [1.5, 1.6, 1.7]) + _rows("apollo_mini_adamw", None, 1e-2, [1.3, 1.4, 1.5], variant="head")
    groups = convergence.seed_groups(rows)
    galore, fira, apollo, mini = convergence.projector_verdicts(groups)  # the variant's lr is not its plan's: no verdict
    assert "rsvd 1.1033" in galore  # the rsvd row, not its variant's
    assert mini.startswith("- ApolloMiniAdamW at lr 0.03 and 0.01") and "head - default -0.2000" in mini
    assert "**head lower than default by more than the seed noise**" in mini
    assert apollo.startswith("- ApolloAdamW") and "default 1.6000 ± 0.1000, fp32-sketch 1.6000 ± 0.0954" in apollo and "**within seed noise**" in apollo
    assert galore.startswith("- GaLoreAdamW") and "**within seed noise**" in galore  # 0.0033 against a 0.1 spread
    assert fira.startswith("- FiraAdamW") and "**rsvd higher than svd by more than the seed noise**" in fira
    assert "+0.1000" in fira  # +0.1 on every seed, against a spread of 0.01
    better = [g | {"losses": [x - 0.2 for x in g["losses"]]} if g["projector"] == "rsvd" else g for g in groups]
    assert "**rsvd lower than svd by more than the seed noise**" in convergence.projector_verdicts(better)[0]
    table = convergence.long_table([g for g in groups if "long" in g["sweeps"]], adamw)
    assert "| GaLoreAdamW (rsvd) | 0.01 | 16 | 3 | 1.1033 ± 0.0902 |" in table
    assert table.index("torch AdamW | 0.001") < table.index("torch AdamW | 0.003")  # AdamW first, by lr


def test_long_lr_check_names_a_better_neighbour():
    lrs = {(o, p): x for o, p, x, k in convergence.LONG_CONTENDERS if k is None}
    lr = lrs[("galore_adamw", "svd")]
    low, high = convergence.ladder_step(lr, -1), convergence.ladder_step(lr, 1)
    rows = _rows("galore_adamw", "svd", lr, [1.5]) + _rows("galore_adamw", "svd", low, [1.6], ("long-lr",))
    rows += _rows("galore_adamw", "svd", high, [1.4], ("long-lr",))
    dct = lrs[("dct_adamw", None)]
    rows += _rows("dct_adamw", None, dct, [1.5])
    table = convergence.lr_check_table(rows, first_seed=0)
    assert f"| GaLoreAdamW (svd) | {lr:g}: 1.5000 | 1.6000 ({low:g}) | 1.4000 ({high:g}) | **{high:g}** (-0.1000) |" in table
    assert f"| DCTAdamW | {dct:g}: 1.5000 | - | - | this lr |" in table


def test_long_quick_two_shards_then_resume(tmp_path, monkeypatch):
    """The preset at a toy size, as two shards in turn: each trains its half, the second's
    report holds both, and a third call trains nothing."""
    argv = ["--preset", "long", "--quick", "--no-progress", "--out", str(tmp_path)]
    first = convergence.main([*argv, "--shard", "0/2", "--no-plots"])
    planned = len(convergence.LONG_ADAMW_GRID) + len(convergence.LONG_CONTENDERS)
    assert len(first["rows"]) == planned  # 2 seeds, every other run
    second = convergence.main([*argv, "--shard", "1/2"])
    assert len(second["rows"]) == 2 * planned
    assert {r["run"] for r in first["rows"]} < {r["run"] for r in second["rows"]}
    groups = second["groups"]
    assert len(groups) == planned and all(g["seeds"] == [0, 1] for g in groups)
    for g in groups:
        assert math.isfinite(g["mean"]) and g["std"] >= 0 and g["min"] <= g["mean"] <= g["max"]
        assert g["state_bytes"] > 0
    assert {(g["optimizer"], g["projector"], g["variant"]) for g in groups} == {(o, p, k) for o, p, _, k in convergence.LONG_CONTENDERS} | {("adamw", None, None)}
    settings = second["settings"]
    tokens = convergence.LONG_QUICK["steps"] * convergence.LONG_QUICK["batch_size"] * convergence.LONG_QUICK["seq_len"]
    assert (settings["parameters"], settings["tokens"]) == (131_904, tokens)
    out = tmp_path / "convergence_long_quick"
    report = (out / "convergence_long.md").read_text()
    assert "131,904 parameters" in report and f"{tokens:,} training tokens" in report
    assert "below the issue's 15" in report  # the toy size says it is a toy
    assert report.count("seed noise**") == 6  # GaLore's and Fira's svd/rsvd, and one per variant (4)
    if importlib.util.find_spec("matplotlib"):
        assert (out / "convergence_long.png").stat().st_size > 1000

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(convergence.pretrain, "train_one", no_training)
    again = convergence.main(argv)
    assert [r["val_loss"] for r in again["rows"]] == [r["val_loss"] for r in second["rows"]]


# ---------------------------------------------------------------------------- bench_sketch.py
def test_bench_sketch_quick_times_both_products_and_says_what_auto_picks(tmp_path):
    bench_sketch = bench_script("bench_sketch")
    raw = bench_sketch.main(["--quick", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)])
    rows = raw["cases"]
    assert [(r["rank"], r["auto"]) for r in rows] == [(1, "fp32"), (16, "bf16")]  # the documented threshold
    for r in rows:
        assert r["fp32_ms"] > 0 and r["bf16_ms"] > 0 and r["ratio"] == pytest.approx(r["bf16_ms"] / r["fp32_ms"])
        assert 0 < r["error"] < 0.02  # bf16 operands: about 2^-8 relative, not a different sketch
    assert "| 64x96 | 16 |" in (tmp_path / "bench_sketch.md").read_text()


def test_a_peer_left_out_by_only_is_not_called_failed():
    ours = compare.Contender("ours X", lambda s: None, "lowrank_optim", "peer Y", step_times=[1.0, 1.0])
    left_out = compare.rows([ours], gap=2)[0]
    assert left_out["peer"] == "peer Y (not in --only)"
    crashed = compare.Contender("peer Y", lambda s: None, "torch")  # selected, never timed
    assert compare.rows([ours, crashed], gap=2)[0]["peer"] == "peer Y (failed)"
