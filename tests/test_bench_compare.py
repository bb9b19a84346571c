"""Smoke tests of bench/compare.py and bench/convergence.py (their --quick modes) and of
their pure helpers.  No timing is asserted: only that every contender is accounted for,
that the numbers are sane, and that our state is the analytical minimum."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = str(Path(__file__).resolve().parents[1] / "bench")


def bench_script(name: str):
    """Import ``bench/<name>.py``.  The path goes in before each import: importing the peer
    packages (through bench_galore) resets ``sys.path`` in this environment."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return pytest.importorskip(name)


compare = bench_script("compare")  # needs galore_torch and fira (bench_galore imports them)
convergence = bench_script("convergence")

QUICK_COMPARE = [
    "ours GaLoreAdamW svd",
    "ours FiraAdamW",
    "ours ApolloAdamW",
    "ours ApolloAdamW keep",
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
