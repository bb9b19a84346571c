"""bench/gpu_check.sh's plumbing, by its CPU dry run (GPU_CHECK_ALLOW_CPU=1, tiny shapes).

What a GPU day needs from the script, short of the GPU: every stage runs under its time
box with flags its script accepts, writes its JSON, a failing stage (here the build: this
machine's torch is a CPU build) is recorded with its reason while the later stages still
run, and summary.md/summary.json gather it all.  Nothing about speed is asserted.  About
20-30 s on 2 cores (six Python processes, each importing torch).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STAGES = ("env", "build", "tests", "kernels", "step", "memory")


def run(out: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "GPU_CHECK_ALLOW_CPU": "1", "PYTHON": sys.executable, **env}
    environ.pop("LOWRANK_OPTIM_EXT_PATH", None)
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=environ, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs the real gpu_check.sh, not the dry run")
    pytest.importorskip("galore_torch")  # the step stage's peer
    out = tmp_path_factory.mktemp("gpu_check")
    result = run(out)
    return out, result


def test_every_stage_is_recorded_and_a_failing_build_does_not_stop_the_rest(dry_run):
    out, result = dry_run
    records = {s: json.loads((out / f"{s}.json").read_text()) for s in STAGES}
    for stage, record in records.items():
        assert record["stage"] == stage and record["timeout_s"] > 0 and (out / record["log"]).exists()
    assert torch.version.cuda is None  # this machine's torch: the build must fail, and say why
    assert records["build"]["status"] == "failed" and records["build"]["exit_code"] != 0
    assert "CPU build" in json.loads((out / "build.details.json").read_text())["error"]
    later = {s: records[s]["status"] for s in ("env", "tests", "kernels", "step", "memory")}
    assert later == dict.fromkeys(later, "passed"), (later, result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 1  # not every stage passed


def test_the_summary_gathers_the_stages_and_their_results(dry_run):
    out, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["build"] and set(summary["stages"]) == set(STAGES)
    text = (out / "summary.md").read_text()
    assert "Dry run on CPU" in text
    for stage in STAGES:
        assert f"| {stage} | **" in text
    assert "### build (failed, exit code 1)" in text  # the failing stage's log tail
    assert "skipped" in summary["tests"]  # the CUDA tests ran (and skip without a GPU)
    assert (out / "tests.xml").exists()


def test_each_measuring_stage_wrote_sane_numbers(dry_run):
    out, _ = dry_run
    kernels = json.loads((out / "kernels" / "kernels.json").read_text())
    assert kernels["rsvd"] and kernels["int4"]
    assert all(row["auto_paths"] == "default kernel" for row in kernels["int4"])  # CPU: no choice to make
    step = json.loads((out / "step.details.json").read_text())
    assert set(step["results"]) == {"galore_torch", "ours svd", "ours rsvd", "ours rsvd bf16"}
    for ratios in step["ratios"].values():
        assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    assert isinstance(step["met"], bool)
    memory = json.loads((out / "memory.details.json").read_text())
    assert not memory["errors"] and memory["device"] == "cpu"
    assert set(memory["optimizers"]) == {"adamw", "galore_adamw", "galore_adamw8bit", "qgalore_adamw8bit"}
    assert all(row["state_mib"] > 0 and row["peaks_mib"] == {} for row in memory["optimizers"].values())


def test_a_spent_budget_skips_the_stages_and_still_writes_the_summary(tmp_path):
    result = run(tmp_path, GPU_CHECK_BUDGET_S="0")
    records = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in STAGES}
    assert {r["status"] for r in records.values()} == {"skipped"}
    assert result.returncode == 1 and (tmp_path / "summary.md").exists()
