"""The Gymnasium environments: the checker, seeding, the reference returns against `rankpilot
eval`, and bad input."""

import json
import subprocess

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import rankpilot


@pytest.mark.parametrize("preset", ["wireless-rayleigh", "latency", "budget"])
def test_env_checker_passes(preset):
    env = rankpilot.make_env(preset)
    check_env(env, skip_render_check=True)
    n = env.n_sites
    assert env.observation_space["sites"].shape == (n, len(rankpilot.site_feature_names()))
    assert env.observation_space["global"].shape == (len(rankpilot.global_feature_names()),)
    # One rank index per site, plus the skip flag where the resource allows skipping.
    assert env.action_space.shape == (n + (preset != "budget"),)


def test_registered_with_gymnasium():
    env = gym.make("rankpilot/RankEnv-v0", preset="latency")
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)


def test_vector_env_matches_single_envs_and_auto_resets():
    seed = 11
    venv = rankpilot.make_vec_env("wireless-rayleigh", num_envs=3, seed=seed)
    obs, _ = venv.reset(seed=seed)
    singles = [rankpilot.make_env("wireless-rayleigh") for _ in range(3)]
    for i, env in enumerate(singles):
        o, _ = env.reset(seed=rankpilot.derive_seed(seed, i))
        np.testing.assert_array_equal(o["sites"], obs["sites"][i])
        np.testing.assert_array_equal(o["global"], obs["global"][i])
    rng = np.random.default_rng(0)
    finished = 0
    for t in range(venv._native.rounds):
        actions = venv.action_space.sample()
        actions[:, -1] = rng.random(3) < 0.2
        obs, rew, term, trunc, infos = venv.step(actions)
        for i, env in enumerate(singles):
            o, r, d, _, info = env.step(actions[i])
            assert r == pytest.approx(rew[i], abs=0, rel=1e-6)
            assert d == term[i]
            if d:
                s = infos["final_info"][i]
                assert s["return"] == pytest.approx(info["episode_summary"]["return"], rel=1e-9)
                finished += 1
            else:
                np.testing.assert_array_equal(o["sites"], obs["sites"][i])
    assert finished == 3 and term.all() and not trunc.any()
    # Auto-reset in the same step: the next episode's first observation.
    assert np.all(obs["global"][:, rankpilot.global_feature_names().index("progress")] == 0)


def test_reference_returns_equal_rankpilot_eval(rankpilot_bin, tmp_path):
    """Episode e of `rankpilot eval --seed S` is `reset(seed=derive_seed(S, e))`; the oracle's
    return in `info` and the checkpoint's greedy return agree with the CLI's table."""
    episodes, seed = 4, 77
    ckpt = rankpilot.Policy.load(rankpilot_bin.parents[2] / "checkpoints" / "default")
    out = tmp_path / "eval.json"
    subprocess.run(
        [str(rankpilot_bin), "eval", "--env", "latency", "--episodes", str(episodes), "--seed", str(seed),
         "--policy", "uniform,oracle", "--checkpoint", str(rankpilot_bin.parents[2] / "checkpoints" / "default"),
         "--json", str(out), "--device", "cpu"],
        check=True, capture_output=True,
    )
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    env = rankpilot.make_env("latency")
    returns, oracle, uniform, gaps = [], [], [], []
    for e in range(episodes):
        obs, info = env.reset(seed=rankpilot.derive_seed(seed, e))
        ckpt.reset()
        done = False
        while not done:
            obs, r, done, _, info = env.step(env.action_for(ckpt.act(obs, info)))
        s = info["episode_summary"]
        returns.append(s["return"])
        oracle.append(s["oracle_return"])
        uniform.append(s["uniform_return"])
        gaps.append(s["gap_closed"])
    np.testing.assert_allclose(oracle, rows["oracle"]["returns"], rtol=1e-9)
    np.testing.assert_allclose(uniform, rows["uniform"]["returns"], rtol=1e-9)
    np.testing.assert_allclose(returns, rows["default"]["returns"], rtol=1e-9)
    assert np.all(np.isfinite(gaps))


def test_bad_input_is_a_value_error_naming_what_is_allowed():
    with pytest.raises(ValueError, match="unknown preset `nope`.*wireless-rayleigh"):
        rankpilot.make_env("nope")
    env = rankpilot.make_env("budget")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="allowed"):
        env.step(np.zeros(3, dtype=np.int64))
    bad = np.zeros(env.action_space.shape, dtype=np.int64)
    bad[0] = 99
    with pytest.raises(ValueError, match="rank index 99: allowed: 0 to"):
        env.step(bad)
    with pytest.raises(ValueError, match="skip on a preset whose resource is a fixed budget"):
        env.action_for(None)
    with pytest.raises(ValueError, match="num_envs = 0"):
        rankpilot.make_vec_env("budget", num_envs=0)
