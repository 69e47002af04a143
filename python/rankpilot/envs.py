"""Gymnasium environments over the Rust simulator (``envs::VecEnv``).

One round of a simulated LoRA fine-tuning run is one step. The observation is a dict:

- ``"global"``: ``[G]`` float32, the run-level features named by
  :func:`rankpilot.global_feature_names` (budget estimates, progress, loss ratio, …);
- ``"sites"``: ``[n_sites, S]`` float32, one row per adapted projection, named by
  :func:`rankpilot.site_feature_names`.

The action is a ``MultiDiscrete``: one rank *index* into ``env.ranks`` per site, followed, where
the resource allows skipping a round (a channel or a compute budget, not a fixed parameter
budget), by a skip flag (1 = skip: keep the adapters, send and train nothing).

``info`` always has ``"context"`` (a :class:`rankpilot._native.RoundContext`: what a policy may
use besides the observation, e.g. the round's conservative budget). When an episode ends, ``info``
has ``"episode_summary"``: the episode's ``return``, ``final_loss``, ``resource_used``,
``violations``, ``skips``, ``rounds`` and, unless ``reference_returns=False``, the oracle's and
the uniform plan's return on the same episode and ``gap_closed`` =
(R − R_uniform) / (R_oracle − R_uniform), as ``rankpilot eval`` computes it.

Seeding: ``env.reset(seed=s)`` starts the episode that ``rankpilot`` starts from seed ``s``, so
episode ``e`` of ``rankpilot eval --seed S`` is ``env.reset(seed=rankpilot.derive_seed(S, e))``.
``reset()`` without a seed starts a new episode from a seed drawn from ``env.np_random``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from . import _native

# Seeds are u64 in Rust; seeds drawn from np_random stay below 2**63 (int64).
_SEED_MOD = 2**64
_SEED_BOUND = 2**63


def _spaces(native: _native.VecEnv) -> tuple[spaces.Dict, spaces.MultiDiscrete]:
    g = len(_native.global_feature_names())
    s = len(_native.site_feature_names())
    n = native.n_sites
    obs = spaces.Dict(
        {
            "global": spaces.Box(-np.inf, np.inf, shape=(g,), dtype=np.float32),
            "sites": spaces.Box(-np.inf, np.inf, shape=(n, s), dtype=np.float32),
        }
    )
    nvec = [len(native.ranks)] * n + ([2] if native.can_skip else [])
    return obs, spaces.MultiDiscrete(np.array(nvec, dtype=np.int64))


class RankEnv(gym.Env):
    """One simulated environment of a preset (see the module documentation)."""

    metadata = {"render_modes": []}

    def __init__(self, preset: str = "wireless-rayleigh", reference_returns: bool = True):
        self._native = _native.VecEnv(preset, 1, 0, reference_returns)
        self.observation_space, self.action_space = _spaces(self._native)
        self.preset = self._native.preset
        self.ranks = np.array(self._native.ranks, dtype=np.int64)
        self.n_sites = self._native.n_sites
        self.can_skip = self._native.can_skip
        self.site_names = self._native.site_names

    def _obs(self, g: np.ndarray, s: np.ndarray) -> dict[str, np.ndarray]:
        return {"global": g.reshape(-1), "sites": s.reshape(self.n_sites, -1)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        episode_seed = int(seed) % _SEED_MOD if seed is not None else int(self.np_random.integers(_SEED_BOUND))
        g, s = self._native.reset_one(0, episode_seed)
        return self._obs(g, s), {"context": self._native.context(0)}

    def step(self, action):
        a = np.asarray(action, dtype=np.int64).reshape(-1)
        if a.shape != self.action_space.shape:
            raise ValueError(f"action of shape {a.shape}: allowed: {self.action_space.shape} (see env.action_space)")
        skip = np.array([bool(a[self.n_sites])]) if self.can_skip else None
        g, s, r, d, finished = self._native.step(a[None, : self.n_sites], skip)
        info: dict[str, Any] = {"context": self._native.context(0)}
        if finished:
            info["episode_summary"] = finished[0]
        return self._obs(g[0], s[0]), float(r[0]), bool(d[0]), False, info

    def action_for(self, plan) -> np.ndarray:
        """The action that plays ``plan`` (rank values, e.g. :meth:`rankpilot.Policy.act`'s), or
        skips when ``plan`` is ``None``."""
        return action_for(plan, self.ranks, self.can_skip, self._native.rank_indices(0))

    def oracle_plan(self) -> list[int]:
        """The privileged oracle's plan (rank values) for this round."""
        return self._native.oracle_plan(0)


def action_for(plan, ranks: np.ndarray, can_skip: bool, current: list[int]) -> np.ndarray:
    """The ``MultiDiscrete`` action that plays ``plan`` (rank values), or skips if ``None``."""
    if plan is None:
        if not can_skip:
            raise ValueError("a skip on a preset whose resource is a fixed budget: allowed: a plan")
        return np.array(list(current) + [1], dtype=np.int64)
    lookup = {int(r): i for i, r in enumerate(ranks)}
    try:
        idx = [lookup[int(r)] for r in plan]
    except KeyError as e:
        raise ValueError(f"rank {e.args[0]}: allowed: {list(map(int, ranks))}") from None
    return np.array(idx + ([0] if can_skip else []), dtype=np.int64)


class RankVectorEnv(VectorEnv):
    """``num_envs`` environments of one preset stepped together in Rust, auto-resetting in the
    same step (``AutoresetMode.SAME_STEP``): the observation returned with a termination is the
    next episode's first, and ``infos["final_info"]`` holds the finished episode's summary.
    Episodes end by termination at a fixed horizon, so no terminal observation is needed for
    bootstrapping and none is returned."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, preset: str = "wireless-rayleigh", num_envs: int = 8, reference_returns: bool = True):
        self._native = _native.VecEnv(preset, num_envs, 0, reference_returns)
        self.num_envs = num_envs
        self.single_observation_space, self.single_action_space = _spaces(self._native)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.preset = self._native.preset
        self.ranks = np.array(self._native.ranks, dtype=np.int64)
        self.n_sites = self._native.n_sites
        self.can_skip = self._native.can_skip

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        """``seed`` an int: environment i starts from ``derive_seed(seed, i)`` (as in
        ``rankpilot train --seed``); a list: environment i starts from ``seed[i]``; ``None``:
        seeds drawn from ``self.np_random``."""
        if isinstance(seed, int):
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
            g, s = self._native.reset(seed % _SEED_MOD)
        else:
            if seed is None:
                seeds = [int(self.np_random.integers(_SEED_BOUND)) for _ in range(self.num_envs)]
            else:
                if len(seed) != self.num_envs:
                    raise ValueError(f"{len(seed)} seeds: allowed: one per environment ({self.num_envs})")
                seeds = [int(x) % _SEED_MOD for x in seed]
            for i, x in enumerate(seeds):
                self._native.reset_one(i, x)
            g, s = self._native.observe()
        return {"global": g, "sites": s}, {}

    def step(self, actions):
        a = np.asarray(actions, dtype=np.int64)
        if a.shape != self.action_space.shape:
            raise ValueError(f"actions of shape {a.shape}: allowed: {self.action_space.shape}")
        skip = a[:, self.n_sites].astype(bool) if self.can_skip else None
        g, s, r, d, finished = self._native.step(np.ascontiguousarray(a[:, : self.n_sites]), skip)
        infos: dict[str, Any] = {}
        if finished:
            final = np.full(self.num_envs, None, dtype=object)
            mask = np.zeros(self.num_envs, dtype=bool)
            for f in finished:
                final[f["env"]] = f
                mask[f["env"]] = True
            infos["final_info"] = final
            infos["_final_info"] = mask
        return (
            {"global": g, "sites": s},
            r.astype(np.float64),
            d.copy(),
            np.zeros(self.num_envs, dtype=bool),
            infos,
        )

    def context(self, index: int) -> _native.RoundContext:
        """Environment ``index``'s round context (for :meth:`rankpilot.Policy.act`)."""
        return self._native.context(index)


def make_env(preset: str = "wireless-rayleigh", reference_returns: bool = True) -> RankEnv:
    """A Gymnasium environment of ``preset`` (an embedded name, see
    :func:`rankpilot.preset_names`, or a ``.toml`` path)."""
    return RankEnv(preset, reference_returns=reference_returns)


def make_vec_env(
    preset: str = "wireless-rayleigh", num_envs: int = 8, seed: int | None = None, reference_returns: bool = True
) -> RankVectorEnv:
    """``num_envs`` environments of ``preset`` stepped together in Rust (seeded with ``seed``
    when given)."""
    env = RankVectorEnv(preset, num_envs, reference_returns=reference_returns)
    if seed is not None:
        env.reset(seed=seed)
    return env



gym.register(id="rankpilot/RankEnv-v0", entry_point="rankpilot.envs:RankEnv")
