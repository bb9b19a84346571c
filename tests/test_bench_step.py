"""Smoke test of bench/bench_step.py (--quick): every case reports a row with sane numbers and
the GPU-only rows say they need a GPU.  No timing ratio is asserted: speed is bench/'s business."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = str(Path(__file__).resolve().parents[1] / "bench")

TIMED = ["galore_60m steady", "galore_60m two-product floor", "galore_60m amortized T=200", "overhead_96x64",
         "overhead_96x64 per-parameter", "fira_60m steady", "fira_60m two-product floor", "compiled"]  # fmt: skip
GPU_ONLY = ["fused_1b", "kernels_1b"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if BENCH not in sys.path:  # importing the peer packages may reset sys.path: insert right before
        sys.path.insert(0, BENCH)
    bench_step = pytest.importorskip("bench_step")  # needs galore_torch and fira
    out = tmp_path_factory.mktemp("bench_step")
    threads = torch.get_num_threads()
    try:
        raw = bench_step.main(["--quick", "--no-progress", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return raw, out


def test_every_case_has_a_row_with_finite_positive_numbers(quick_run):
    raw, _ = quick_run
    rows = {r["case"]: r for r in raw["rows"]}
    assert set(rows) == {*TIMED, "peak_1b", "peak_1b per-parameter", *GPU_ONLY}
    for case in TIMED:
        r = rows[case]
        assert r["unit"] == "s" and r["note"] != "needs a GPU"
        for value in (r["ours"], r["peer"], r["ratio"]):
            assert math.isfinite(value) and value > 0, (case, r)
    assert rows["galore_60m steady"]["target"] == "<= 0.75" and rows["overhead_96x64"]["target"] == "<= 1.5"
    assert rows["fira_60m steady"]["target"] == "<= 0.6"
    assert isinstance(rows["galore_60m steady"]["met"], bool)
    assert math.isfinite(raw["extra"]["compile_s"])


def test_peak_rows_come_from_child_processes(quick_run):
    raw, _ = quick_run
    peak = {r["case"]: r for r in raw["rows"] if r["case"].startswith("peak_1b")}
    assert peak["peak_1b"]["unit"] == "B" and isinstance(peak["peak_1b"]["met"], bool)
    assert peak["peak_1b per-parameter"]["ours_label"] == "ours foreach=False"
    for who in ("ours", "ours foreach=False", "galore_torch"):
        child = raw["extra"]["peak_1b"][who]
        assert child["state_bytes"] > 0 and child["weights_grads_bytes"] > 0 and child["matrix_bytes"] > 0
        if sys.platform.startswith("linux"):  # the resident high-water mark is Linux-only
            assert child["peak_bytes"] >= 0 and math.isfinite(child["peak_matrices"])
    # ours keeps exactly basis + two moments; galore_torch's basis is a slice of a bigger factor
    assert raw["extra"]["peak_1b"]["ours"]["state_bytes"] < raw["extra"]["peak_1b"]["galore_torch"]["state_bytes"]


def test_gpu_rows_need_a_gpu_on_cpu(quick_run):
    raw, _ = quick_run
    for r in (r for r in raw["rows"] if r["case"] in GPU_ONLY):
        assert r["note"] == "needs a GPU" and r["ours"] is None and r["met"] is None


def test_markdown_and_json_are_written(quick_run):
    raw, out = quick_run
    saved = json.loads((out / "bench_step.json").read_text())
    assert {"machine", "args", "repeats", "rows", "extra", "samples_s", "elapsed_s"} <= set(saved)
    assert saved["rows"] == raw["rows"]
    assert all(len(s) == raw["repeats"] for s in saved["samples_s"].values())  # --quick: 3 of each
    table = (out / "bench_step.md").read_text()
    assert all(f"| {case} |" in table for case in [*TIMED, "peak_1b", "peak_1b per-parameter", *GPU_ONLY])
    assert "peak rise (matrices)" in table
    assert table.count("needs a GPU") >= len(GPU_ONLY)
