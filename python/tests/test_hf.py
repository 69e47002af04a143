"""The Trainer callback: function-preserving resizes, a real Trainer + PEFT run whose modules
shrink and grow, and a saved adapter that PEFT loads with the same logits."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

import hf_tiny
from rankpilot.hf import RankScheduleCallback, squeeze_qr_core

HERE = os.path.dirname(__file__)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_squeeze_qr_core_is_the_best_rank_k_approximation():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(40, 6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 30, generator=g, dtype=torch.float64)
    b_k, a_k, s = squeeze_qr_core(b, a, 3)
    full = torch.linalg.svdvals(b @ a)
    torch.testing.assert_close(s, full[:6])
    err = torch.linalg.matrix_norm(b @ a - b_k @ a_k)
    assert err.item() == pytest.approx(full[3:].square().sum().sqrt().item(), rel=1e-10)


def test_resizes_preserve_the_function():
    model = hf_tiny.peft_model(0, r=4)
    cb = RankScheduleCallback(scheduler="fixed:8", budget="rank:8")
    cb.prepare(model)
    ids = hf_tiny.Sequences(4, 1).ids
    gen = torch.Generator().manual_seed(0)
    site = cb.sites[0]
    # PEFT's init has B = 0; give the module a real rank-3 product first.
    with torch.no_grad():
        site.b(cb.adapter)[:, :3] = torch.randn(site.d_out, 3, generator=gen) * 0.5
    before = logits(model, ids)
    # Shrinking 4 -> 3 keeps every non-zero singular value (the product has rank 3).
    assert cb.resize(site, 3, gen) == "shrink"
    assert (logits(model, ids) - before).abs().max().item() <= 1e-5
    shrunk = logits(model, ids)
    # Growing adds directions with zero B columns: exactly the same output.
    assert cb.resize(site, 8, gen) == "grow"
    assert torch.equal(logits(model, ids), shrunk)
    assert site.a(cb.adapter)[3:8].abs().sum() > 0 and site.b(cb.adapter)[:, 3:8].abs().sum() == 0
    # Shrinking below the true rank loses exactly the dropped components.
    assert cb.resize(site, 1, gen) == "shrink"
    assert (logits(model, ids) - before).abs().max().item() > 1e-4


@pytest.fixture(scope="module")
def adalora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adalora")
    model, cb, loss = hf_tiny.train(str(out), "adalora", "rank:4", steps=40, round_steps=10, batch=8, save_steps=20)
    return out, model, cb, loss


def test_a_trainer_run_shrinks_and_grows_modules(adalora_run):
    out, model, cb, loss = adalora_run
    ranks = [h["ranks"] for h in cb.history]
    assert len(ranks) == 4
    grew = any(b > a for h0, h1 in zip([[4] * len(cb.sites)] + ranks, ranks) for a, b in zip(h0, h1))
    shrank = any(b < a for h0, h1 in zip(ranks, ranks[1:]) for a, b in zip(h0, h1))
    assert grew and shrank, ranks
    # Not every module ends at the same rank: the plan is per module.
    assert len(set(ranks[-1])) > 1, ranks[-1]
    # The run learned.
    assert loss < math.log(hf_tiny.VOCAB) - 0.15
    # The callback's rounds are in the Trainer's TensorBoard run: one directory, both writers.
    (run,) = list((out / "runs").iterdir())
    assert len([f for f in os.listdir(run) if f.startswith("events.out.tfevents")]) == 2


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(adalora_run, tmp_path):
    out, model, cb, loss = adalora_run
    ids = hf_tiny.Sequences(4, 7).ids
    want = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    final = dict(zip([s.name for s in cb.sites], cb.history[-1]["ranks"]))
    for name, r in final.items():
        if r > 0:
            assert cfg["rank_pattern"][name] == r
        else:
            assert name in cfg["exclude_modules"]
    loaded = PeftModel.from_pretrained(hf_tiny.base_model(0), tmp_path / "adapter")
    got = logits(loaded, ids)
    assert (got - want).abs().max().item() <= 1e-5
    # Each module came back at its final rank.
    for n, m in loaded.named_modules():
        short = n.replace("base_model.model.", "")
        if short in final and final[short] > 0:
            assert m.lora_A["default"].weight.shape[0] == final[short]


def test_trainer_checkpoints_hold_loadable_adapters(adalora_run):
    out, model, cb, loss = adalora_run
    ckpt = out / "checkpoint-20" / "adapter"
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    at_20 = dict(zip([s.name for s in cb.sites], next(h["ranks"] for h in cb.history if h["step"] == 20)))
    loaded = PeftModel.from_pretrained(hf_tiny.base_model(0), ckpt)
    for n, m in loaded.named_modules():
        short = n.replace("base_model.model.", "")
        if short in at_20 and at_20[short] > 0:
            assert m.lora_A["default"].weight.shape[0] == at_20[short] == cfg["rank_pattern"][short]


def test_a_resumed_trainer_run_continues_the_schedule(adalora_run, tmp_path):
    """Interrupted at step 25 (mid-round), resumed from checkpoint-25: the same plans and the
    same final adapter as the uninterrupted run."""
    out, model, cb, loss = adalora_run
    part = tmp_path / "part"
    hf_tiny.train(str(part), "adalora", "rank:4", steps=40, round_steps=10, batch=8, save_steps=25, stop_after=25)
    resumed, cb2, loss2 = hf_tiny.train(
        str(part), "adalora", "rank:4", steps=40, round_steps=10, batch=8, save_steps=25,
        resume=str(part / "checkpoint-25"),
    )
    assert [h["ranks"] for h in cb2.history] == [h["ranks"] for h in cb.history]
    ids = hf_tiny.Sequences(4, 7).ids
    assert (logits(resumed, ids) - logits(model, ids)).abs().max().item() <= 1e-5
    assert abs(loss2 - loss) <= 1e-5


def test_a_policy_schedules_a_trainer_run_over_a_channel(tmp_path, root):
    model, cb, loss = hf_tiny.train(
        str(tmp_path), f"policy:{root / 'checkpoints' / 'default'}", "rank:4", steps=20, round_steps=5, batch=4,
        resource="wireless-rayleigh",
    )
    assert len(cb.history) == 4
    assert all(h["params"] <= cb.controller.budget_params for h in cb.history if not h["skipped"])
    for h in cb.history:
        assert set(h["ranks"]) <= set(cb.controller.rank_set)


def test_bad_scheduler_names_what_is_allowed():
    model = hf_tiny.peft_model(0)
    with pytest.raises(ValueError, match="unknown scheduler `nope`: allowed: fixed"):
        RankScheduleCallback(scheduler="nope").prepare(model)
    with pytest.raises(ValueError, match="round_steps = 0"):
        RankScheduleCallback(round_steps=0)


def test_torchrun_two_processes_apply_identical_plans(tmp_path):
    """2 processes (gloo, global batch 8 = 2 x 4) against 1 process (batch 8)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = os.path.join(HERE, "hf_tiny.py")
    common = ["--scheduler", "adalora", "--budget", "rank:4", "--steps", "30", "--round-steps", "10", "--batch", "8"]
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         script, str(tmp_path / "ddp"), *common],
        check=True, env=env, capture_output=True, timeout=600,
    )
    subprocess.run([sys.executable, script, str(tmp_path / "one"), *common], check=True, env=env,
                   capture_output=True, timeout=600)
    r0, r1 = (json.loads((tmp_path / "ddp" / f"result-{i}.json").read_text()) for i in (0, 1))
    one = json.loads((tmp_path / "one" / "result-0.json").read_text())
    assert r0["world"] == 2 and r0["ranks"] == r1["ranks"]
    assert r0["lora_sums"] == r1["lora_sums"], "both processes hold the same adapter"
    # The same global batch: the same plans in every round, and the same validation loss up to
    # the float error of averaging gradients over processes (measured: 5e-7).
    assert r0["ranks"] == one["ranks"]
    assert abs(r0["val_loss"] - one["val_loss"]) < 1e-2, (r0["val_loss"], one["val_loss"])
