"""Layer-wise mode under DDP and FSDP2 (issue 14): two gloo processes on CPU.

One spawn (tests/_layerwise_distributed_worker.py) trains the same tiny model with the
ordinary step and in layer-wise mode, under DDP (``attach_ddp``) and FSDP2, for 10 steps
with three refreshes, with and without gradient accumulation; the tests read its record.
"""
from __future__ import annotations

import re

import pytest

import _layerwise_distributed_worker as worker
from conftest import needs_gloo

pytestmark = needs_gloo

WORLD = 2


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return worker.spawned_record(worker.run, WORLD, tmp_path_factory.mktemp("layerwise_distributed"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.parametrize("accumulation", worker.ACCUMULATION)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", worker.OPTIMIZERS)
def test_layerwise_equals_the_regular_step(record, name, mode, accumulation):
    entry = record["equivalence"][(name, mode, accumulation)]
    assert max_difference(entry["layerwise"], entry["regular"]) < 1e-5
    assert entry["refreshes"] == 3  # steps 0, 4 and 8 refreshed the basis
    assert entry["grads_left"] == 0  # every gradient was freed once it had stepped
    # and it trained: the weights moved far beyond the tolerance
    initial = dict(worker.make_model().named_parameters())
    assert max_difference({k: initial[k].detach() for k in entry["regular"]}, entry["regular"]) > 1e-2


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_layerwise_clipping_is_per_parameter_on_the_reduced_gradient(record, mode):
    """max_grad_norm clips each averaged (DDP) or reduce-scattered (FSDP2: by the whole
    matrix's norm) gradient on its own, as clip_grad_norm_ on that parameter would."""
    entry = record["clipping"][mode]
    assert max_difference(entry["layerwise"], entry["regular"]) < 1e-5
    unclipped = record["equivalence"][("galore_svd", mode, "none")]["regular"]
    assert max_difference(entry["regular"], unclipped) > 1e-3  # the clip acted


def test_parameters_swapped_in_by_accelerate_get_the_hooks(record):
    swapped, regular = record["swapped"], record["equivalence"][("galore_svd", "fsdp", "none")]["regular"]
    assert max_difference(swapped["params"], regular) < 1e-5
    assert swapped["stepped_in_backward"] == len(regular) and swapped["grads_left"] == 0


def test_ddp_find_unused_parameters_skips_what_no_rank_used(record):
    regular, layerwise = record["unused"][False], record["unused"][True]
    assert max_difference(layerwise["params"], regular["params"]) < 1e-5
    assert regular["b_steps"] == layerwise["b_steps"] == 6  # not on the 3 steps nobody used it


def test_fsdp_layerwise_holds_one_gradient_shard_at_a_time(record):
    """Sampled in a hook of every parameter of an 8-layer model: without layer-wise mode
    every layer's gradient shard is alive at the end of backward; with it, at most one
    parameter's (a weight shard, less than one layer's shard)."""
    regular, layerwise = record["memory"][False], record["memory"][True]
    per_layer = regular["layer_bytes"]  # this rank's shard of each layer's parameters
    assert len(per_layer) == worker.LAYERS and regular["samples"] == layerwise["samples"] == 2 * worker.LAYERS
    assert regular["peak"] == regular["left_after_backward"] == sum(per_layer)
    assert 0 < layerwise["peak"] <= max(per_layer)
    assert layerwise["left_after_backward"] == 0


@pytest.mark.parametrize("saved_layerwise", [True, False])
def test_dcp_checkpoint_resumes_into_layerwise_mode_exactly(record, saved_layerwise):
    entry = record["dcp"][saved_layerwise]
    assert max_difference(entry["resumed"], entry["uninterrupted"]) == 0


@pytest.mark.parametrize(
    "case, kind, message",
    [
        ("no_wrapper", "RuntimeError", r"GaLoreAdamW: layerwise=True .* no data-parallel wrapper reduces .*attach_ddp"),
        ("attach_module", "ValueError", r"attach_ddp needs a DistributedDataParallel model, got Sequential"),
        ("attach_foreign", "ValueError", r"parameter #6 \(shape \(3,\)\) is not reduced by this DistributedDataParallel"),
        ("attach_not_layerwise", "ValueError", r"attach_ddp is for layerwise=True"),
        ("natural_galore_fsdp", "ValueError", r"NaturalGaLoreAdamW: sharded .* not supported"),
    ],
)
def test_refusals(record, case, kind, message):
    error = record["errors"][case]
    assert error.startswith(kind), error
    assert re.search(message, error), error
