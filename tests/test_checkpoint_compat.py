"""Checkpoints written by an earlier release load and continue exactly as they did then.

``fixtures/checkpoints_v1.pt`` holds, for every configuration of ``conftest.OPTIMIZER_CASES``,
the parameters and optimizer state after 5 steps and the parameters 4 steps later, as
written by the template-loop step engine (``fixtures/make_checkpoints.py``).  A change to
the engine or to the state layout must keep loading them (old layouts are converted on
load) and continue as they did: bit for bit where the arithmetic is the same, within
rounding where the engine now projects back straight into the weight.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import OPTIMIZER_CASES, fake_grads, make_params

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "checkpoints_v1.pt", weights_only=True)


def test_the_fixture_covers_every_configuration_it_was_written_for():
    # Configurations added since (APOLLO) have no checkpoint of the old engine to load.
    assert set(FIXTURE["records"]) <= set(OPTIMIZER_CASES) and len(FIXTURE["records"]) >= 29


#: Configurations whose refresh rule has changed since the fixture was written: the
#: randomized SVD now gives each singular pair a fixed sign (docs/methods/projectors.md).
#: With the former rule (signs as the sketch left them) they continue as they did.
REFRESH_RULE_CHANGED = {"galore_rsvd", "qgalore_rsvd_project_simulate"}


@pytest.mark.parametrize("name", sorted(FIXTURE["records"]))
def test_old_checkpoint_loads_and_continues_identically(name, monkeypatch):
    if name in REFRESH_RULE_CHANGED:
        from lowrank_optim.projectors import rsvd

        monkeypatch.setattr(rsvd, "fixed_signs", lambda u, vh: (u, vh))
    record = FIXTURE["records"][name]
    mats, bias = make_params()
    params = [*mats, bias]
    with torch.no_grad():
        for p, saved in zip(params, record["params"]):
            p.copy_(saved)
    opt = OPTIMIZER_CASES[name](mats, bias)
    opt.load_state_dict(record["optim"])
    start = FIXTURE["saved_at"]
    for t in range(start, start + FIXTURE["continued"]):
        fake_grads(params, t)
        opt.step()
    # The dense group's update is torch AdamW's arithmetic in both engines: the same bits.
    assert torch.equal(bias, record["expected"][-1])
    group = opt.param_groups[0]
    pinned = group.get("eps_style") == "hf" or opt.materializes_direction(group, opt._projector(0))
    for p, expected in zip(mats, record["expected"]):
        if pinned:  # the full-size direction is still formed and added: the same bits
            assert torch.equal(p, expected)
        else:  # projected back straight into the weight (one addmm_): rounding moves by an ulp
            torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-6)


def test_an_svd_checkpoint_resumes_under_the_rsvd_default_and_keeps_its_projector():
    """The default projector became rsvd (docs/benchmarks.md): a checkpoint trained with the
    exact SVD (the old default) loads into an optimizer built with the new default and goes
    on with the checkpoint's projector; projectors that keep another state stay refused."""
    import lowrank_optim as lo

    mats, bias = make_params()
    old = lo.GaLoreAdamW([{"params": mats, "rank": 2, "projector": "svd"}, {"params": [bias]}])
    fake_grads([*mats, bias], 0)
    old.step()
    saved = old.state_dict()
    resumed = lo.GaLoreAdamW([{"params": mats, "rank": 2}, {"params": [bias]}])
    assert resumed.param_groups[0]["projector"] == "rsvd"
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["projector"] == "svd"
    dct = lo.GaLoreAdamW([{"params": mats, "rank": 2, "projector": "dct"}, {"params": [bias]}])
    with pytest.raises(ValueError, match="projector='svd', this optimizer was built with projector='dct'"):
        dct.load_state_dict(saved)


def test_an_int4_checkpoint_without_its_inner_projector_resumes_with_the_exact_svd():
    """Q-GaLore's INT4 basis wraps rsvd now, svd before: a group records the inner projector,
    so a checkpoint that does not predates the change and keeps the exact SVD it trained with."""
    import lowrank_optim as lo

    mats, bias = make_params()
    opt = lo.QGaLoreAdamW8bit([{"params": mats, "rank": 2}, {"params": [bias]}], min_8bit_size=16)
    assert opt.param_groups[0]["projector_args"] == {"inner": "rsvd"}  # recorded, not left implicit
    fake_grads([*mats, bias], 0)
    opt.step()
    saved = opt.state_dict()
    old = {**saved, "param_groups": [{**g, "projector_args": None} for g in saved["param_groups"]]}
    opt.load_state_dict(old)
    assert opt.param_groups[0]["projector_args"] == {"inner": "svd"} and opt._projector(0).inner == "svd"
    opt.load_state_dict(saved)
    assert opt._projector(0).inner == "rsvd"
    other = lo.QGaLoreAdamW8bit([{"params": mats, "rank": 2, "projector_args": {"group_size": 64}}, {"params": [bias]}],
                                min_8bit_size=16)
    with pytest.raises(ValueError, match="projector_args="):  # another INT4 group size: another state
        other.load_state_dict(saved)


def test_a_pickled_int4_optimizer_from_before_the_rsvd_default_keeps_the_exact_svd():
    """torch.save(optimizer) of an older release: its group has projector_args=None, read as
    it was meant then (inner "svd"), as load_state_dict reads a state dict."""
    import io

    import lowrank_optim as lo

    mats, bias = make_params()
    opt = lo.QGaLoreAdamW8bit([{"params": mats, "rank": 2}, {"params": [bias]}], min_8bit_size=16)
    fake_grads([*mats, bias], 0)
    opt.step()
    opt.param_groups[0]["projector_args"] = None  # as the older release pickled it
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert restored.param_groups[0]["projector_args"] == {"inner": "svd"}
    assert restored.param_groups[1]["projector_args"] is None  # a dense group has no projector options
