"""The Stable-Baselines3 half of `rankpilot bench ppo`: SB3's PPO (its documented defaults,
`MultiInputPolicy`) trained through rankpilot's Gymnasium environment, then evaluated greedily on
the episodes `rankpilot eval --seed EVAL_SEED` plays (episode e starts from derive_seed(EVAL_SEED, e)).

Usage: sb3_ppo.py <preset> <env_steps> <seed> <eval_seed> <episodes> <threads> <n_envs>
Prints one JSON line: training wall time and env steps/s, raw env steps/s (random actions
through SB3's DummyVecEnv), and per-episode returns of the policy, the oracle and uniform.
"""
import json
import sys
import time

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import rankpilot


def main(preset, env_steps, seed, eval_seed, episodes, threads, n_envs):
    torch.set_num_threads(threads)
    venv = make_vec_env(lambda: rankpilot.make_env(preset, reference_returns=False), n_envs=n_envs, seed=seed)
    # Raw stepping: random actions through the same vectorized env SB3 trains on.
    venv.reset()
    pool = [np.stack([venv.action_space.sample() for _ in range(n_envs)]) for _ in range(64)]
    t0 = time.perf_counter()
    raw_steps = 0
    while time.perf_counter() - t0 < 2.0:
        venv.step(pool[(raw_steps // n_envs) % 64])
        raw_steps += n_envs
    raw_sps = raw_steps / (time.perf_counter() - t0)
    venv.reset()

    # SB3's documented defaults, except n_steps: 2048 transitions per update over all envs (its
    # default with one environment), the same as rankpilot's 32 x 64.
    model = PPO("MultiInputPolicy", venv, n_steps=2048 // n_envs, seed=seed, device="cpu", verbose=0)
    t0 = time.perf_counter()
    model.learn(total_timesteps=env_steps)
    train_s = time.perf_counter() - t0
    trained = model.num_timesteps

    env = rankpilot.make_env(preset)
    returns, oracle, uniform = [], [], []
    for e in range(episodes):
        obs, _ = env.reset(seed=rankpilot.derive_seed(eval_seed, e))
        done = False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, _, done, _, info = env.step(action)
        s = info["episode_summary"]
        returns.append(s["return"])
        oracle.append(s["oracle_return"])
        uniform.append(s["uniform_return"])
    print(json.dumps({
        "env_steps": trained, "train_seconds": train_s, "train_sps": trained / train_s, "raw_sps": raw_sps,
        "returns": returns, "oracle": oracle, "uniform": uniform,
    }))


if __name__ == "__main__":
    p, n, s, es, ep, th, ne = sys.argv[1:8]
    main(p, int(n), int(s), int(es), int(ep), int(th), int(ne))
