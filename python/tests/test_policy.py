"""`Policy.act` gives the CLI's plans (`rankpilot act`) for the same observations."""

import json
import subprocess

import numpy as np
import pytest

import rankpilot


def record(obs, info, new_episode):
    g = dict(zip(rankpilot.global_feature_names(), map(float, obs["global"])))
    names = rankpilot.site_feature_names()
    sites = [dict(zip(names, map(float, row))) for row in obs["sites"]]
    line = {"global": g, "sites": sites, "conservative_budget": info["context"].conservative_budget}
    if new_episode:
        line["new_episode"] = True
    return line


@pytest.mark.parametrize("checkpoint,preset", [("default", "wireless-rayleigh"), ("wireless-rayleigh", "latency")])
def test_policy_act_equals_the_cli(rankpilot_bin, root, tmp_path, checkpoint, preset):
    ckpt = root / "checkpoints" / checkpoint
    policy = rankpilot.Policy.load(ckpt)
    env = rankpilot.make_env(preset, reference_returns=False)
    lines, plans = [], []
    for episode in range(2):
        obs, info = env.reset(seed=1000 + episode)
        policy.reset()
        done = False
        first = True
        while not done:
            lines.append(record(obs, info, first))
            first = False
            plan = policy.act(obs, info)
            plans.append(None if plan is None else plan.tolist())
            obs, _, done, _, info = env.step(env.action_for(plan))
    src = tmp_path / "obs.jsonl"
    src.write_text("".join(json.dumps(l) + "\n" for l in lines))
    out = subprocess.run(
        [str(rankpilot_bin), "act", "--checkpoint", str(ckpt), "--env", preset, "--observations", str(src),
         "--device", "cpu"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    cli = [None if json.loads(l).get("skip") else json.loads(l)["ranks"] for l in out]
    assert cli == plans
    # The decisions are not trivial: some rounds differ from others.
    assert len({json.dumps(p) for p in plans}) > 2


def test_act_refuses_a_misnamed_feature_with_exit_2(rankpilot_bin, root, tmp_path):
    env = rankpilot.make_env("wireless-rayleigh", reference_returns=False)
    obs, info = env.reset(seed=0)
    line = record(obs, info, True)
    line["global"]["progres"] = line["global"].pop("progress")
    src = tmp_path / "obs.jsonl"
    src.write_text(json.dumps(line) + "\n")
    r = subprocess.run(
        [str(rankpilot_bin), "act", "--checkpoint", str(root / "checkpoints" / "default"), "--observations", str(src)],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert "line 1" in r.stderr and "`progres`" in r.stderr and "allowed" in r.stderr


def test_policy_refuses_another_rank_set(root):
    policy = rankpilot.Policy.load(root / "checkpoints" / "default")
    env = rankpilot.make_env("wireless-rayleigh", reference_returns=False)
    obs, info = env.reset(seed=0)
    ctx = info["context"]
    other = type(ctx)([0, 4, 8], ctx.max_ranks, ctx.unit_cost, ctx.resource, ctx.estimated_budget,
                      ctx.conservative_budget, ctx.cost_coef)
    with pytest.raises(ValueError, match="chooses from ranks"):
        policy.act(obs, other)
    with pytest.raises(ValueError, match="observation of shapes"):
        policy.act({"global": obs["global"][:3], "sites": obs["sites"]}, info)
    with pytest.raises(ValueError, match="nonexistent"):
        rankpilot.Policy.load(root / "nonexistent")
    with pytest.raises(ValueError, match="without info"):
        policy.act(obs)


def test_a_policy_bound_to_its_env_acts_on_the_observation_alone(root):
    env = rankpilot.make_env("latency", reference_returns=False)
    bound = rankpilot.Policy.load(root / "checkpoints" / "default", env=env)
    free = rankpilot.Policy.load(root / "checkpoints" / "default")
    obs, info = env.reset(seed=3)
    for _ in range(5):
        a, b = bound.act(obs), free.act(obs, info)
        assert (a is None and b is None) or (a == b).all()
        obs, _, _, _, info = env.step(env.action_for(b))
