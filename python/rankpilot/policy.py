"""A trained rank policy (a ``rankpilot train`` checkpoint) acting from Python."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _native


class Policy:
    """A checkpoint acting greedily, exactly as ``rankpilot eval`` and the ``policy:`` scheduler
    do (the same Rust code). It keeps the episode's history between calls (a prior that infers
    the episode's constants needs it): call :meth:`reset` when an episode begins."""

    def __init__(self, native: _native.Policy, env=None):
        self._native = native
        self._env = env

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike, env=None) -> "Policy":
        """Loads a checkpoint directory (e.g. ``checkpoints/default``). With ``env`` (a
        :class:`rankpilot.RankEnv`, possibly wrapped), :meth:`act` reads the round's context from
        it, so ``act(observation)`` alone suffices."""
        return cls(_native.Policy.load(os.fspath(checkpoint_dir)), env)

    @property
    def ranks(self) -> list[int]:
        """The rank set the policy chooses from."""
        return self._native.ranks

    def reset(self) -> None:
        """Forgets the episode's history."""
        self._native.reset()

    def act(
        self, observation: dict[str, np.ndarray], info: dict[str, Any] | _native.RoundContext | None = None
    ) -> np.ndarray | None:
        """The rank plan (rank values, one per site) for ``observation``, or ``None`` to skip the
        round. ``info`` is the ``info`` dict the environment returned with the observation (or
        its ``"context"``); it may be left out when the policy was loaded with ``env``. The
        context is needed because the plan is projected onto the round's budget in the resource's
        unit, which the (normalised) observation does not carry."""
        if info is None:
            if self._env is None:
                raise ValueError("act(observation) without info: allowed: act(observation, info), or Policy.load(dir, env=env)")
            ctx = self._env.unwrapped._native.context(0)
        else:
            ctx = info["context"] if isinstance(info, dict) else info
        g = np.ascontiguousarray(observation["global"], dtype=np.float32)
        s = np.ascontiguousarray(observation["sites"], dtype=np.float32)
        plan = self._native.act(g, s, ctx)
        return None if plan is None else np.asarray(plan, dtype=np.int64)
