"""DDP, FSDP2 and distributed checkpoints (issue 7): two gloo processes on CPU.

One spawn (tests/_distributed_worker.py) trains the same tiny model under DDP, under FSDP2
and in a single process on the whole global batch, with every shard-aware optimizer, and
records parameters, state sizes, collectives, checkpoints and refusals; the tests below
read that record.  The projected weights have odd row counts (uneven shards).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import _distributed_worker as worker
from conftest import needs_gloo

pytestmark = needs_gloo

WORLD = 2


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return worker.spawned_record(worker.run, WORLD, tmp_path_factory.mktemp("distributed"))


def relative_error(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


@pytest.mark.parametrize("name", worker.OPTIMIZERS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_equals_one_process_on_the_global_batch(record, name, mode):
    single, distributed = record[name]["single"], record[name][mode]
    assert distributed.keys() == single.keys()
    assert relative_error(distributed, single) < 1e-5
    # and it trained: 5 steps moved the weights far beyond that tolerance
    initial = dict(worker.make_model().named_parameters())
    assert relative_error({k: initial[k].detach() for k in single}, single) > 1e-3


def test_std_takes_the_unsharded_side_under_fsdp(record):
    """The 3 x 11 head: one process's std rule picks the left basis (m < n); under FSDP2 the
    right one, which keeps the sharded rows whole (and equals proj_type="right" above)."""
    assert record["galore_std_wide"]["sides"] == [2, 2, 2]  # RIGHT for every weight


@pytest.mark.parametrize("name", worker.OPTIMIZERS)
def test_fsdp_moments_are_sharded_like_the_parameters(record, name):
    """The sharded part of the state (moments; DTensors, so DCP can reshard them) is split
    exactly: the ranks' blocks add up to the single process's moments.  Per rank it is about
    1/W of them: at most ceil(m/W)/(m/W) times 1/W (uneven rows, up to 4/3 for the 3-row
    head), never the whole.  The projector state (basis Q: r x n, indices, integers) is the
    same on every rank, so a rank's total is 1/W of the moments plus one basis, not exactly
    1/W of the single-process total."""
    entry = record[name]
    single = entry["single_state_bytes"]
    (sharded0, replicated), (sharded1, replicated1) = entry["fsdp_state_bytes"]
    assert replicated == replicated1
    assert sharded0 + sharded1 + replicated == single
    rows = [9, 9, 11, 11, 3, 3]  # the two projected weights, the head and the three biases
    excess = max(math.ceil(m / WORLD) * WORLD / m for m in rows)
    for sharded in (sharded0, sharded1):
        assert sharded <= (single - replicated) / WORLD * excess
        assert sharded < single - replicated
    assert "DTensor" in entry["moment_types"]


def test_state_bytes_of_this_rank(record):
    """memory.state_bytes of a sharded optimizer counts this rank's blocks."""
    entry = record["galore_svd"]
    assert entry["fsdp_memory_state_bytes"] == sum(entry["fsdp_state_bytes"][0])


def test_refresh_gathers_to_one_rank_and_never_all_gathers(record):
    log = record["collectives"]
    refresh, ordinary = log["refresh"], log["ordinary"]
    assert not any(name.startswith("all_gather") for name in refresh["calls"])
    # one gather per projected matrix, each rank sending its block padded to the longest
    # one: ceil(m/W) x n numbers, not the m x n matrix an all-gather would hand every rank
    assert refresh["calls"]["gather"] == 2
    padded_blocks = sum(math.ceil(m / WORLD) * n for m, n in log["shapes"])
    assert refresh["elements"]["gather"] == padded_blocks < sum(m * n for m, n in log["shapes"])
    # the new basis comes back by broadcast, one per matrix
    assert refresh["calls"]["broadcast"] == 2
    assert ordinary["calls"] == {}  # between refreshes: no communication at all


def test_a_failed_refresh_is_skipped_on_every_rank(record):
    """Rank 1 holds a NaN; the owner's SVD check fails and rank 0 learns it (the spawn would
    hang otherwise): both keep the first basis and warn."""
    assert record["failed_refresh"] == {"refreshes": 1, "basis_kept": True, "warned": True}


@pytest.mark.parametrize("name", ["galore_svd", "fira", "dct"])
def test_dcp_resume_equals_the_uninterrupted_run(record, name):
    entry = record["dcp"][name]
    for key, value in entry["uninterrupted"].items():
        assert torch.equal(entry["resumed"][key], value), key


def test_dcp_checkpoint_of_two_ranks_loads_into_one_process(record):
    """2 -> 1: DCP reassembles the sharded moments; one process on the whole batch then
    continues as the two ranks did."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    entry = record["dcp"]["galore_svd"]
    model = worker.make_model()
    optimizer = worker.make_optimizer("galore_svd", model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=entry["path"])
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    state = optimizer.state[model[0].weight]
    assert state["exp_avg"].shape == (9, 2) and state["projector"]["right"].shape == (2, 6)
    worker.train(model, optimizer, 2, first=3)
    assert relative_error(worker.full_params(model), entry["uninterrupted"]) < 1e-5


@pytest.mark.parametrize(
    "case, message",
    [
        ("qgalore_fsdp", r"QGaLoreAdamW8bit: sharded .* not supported: .*open_weight"),
        ("natural_galore_fsdp", r"NaturalGaLoreAdamW: sharded .* not supported: .*transform_low_rank_grad"),
        ("left_fsdp", r"GaLoreAdamW: proj_type='left' projects .* sharded dimension 0"),
        ("rows_fsdp", r"FrugalAdamW: projector='rows' projects .* use the 'columns' projector"),
    ],
)
def test_refusals(record, case, message):
    assert record["errors"][case].startswith("ValueError")
    assert re.search(message, record["errors"][case])

