"""Stable-Baselines3's PPO trains on the environment unmodified."""

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import rankpilot


def test_sb3_ppo_trains_and_acts():
    venv = make_vec_env(lambda: rankpilot.make_env("latency", reference_returns=False), n_envs=2, seed=0)
    model = PPO("MultiInputPolicy", venv, n_steps=32, batch_size=32, n_epochs=2, seed=0, device="cpu", verbose=0)
    model.learn(total_timesteps=128)
    env = rankpilot.make_env("latency")
    obs, info = env.reset(seed=5)
    done = False
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        assert env.action_space.contains(action)
        obs, _, done, _, info = env.step(action)
    assert np.isfinite(info["episode_summary"]["gap_closed"])
