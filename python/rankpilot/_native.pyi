"""Type stubs of the Rust extension ``rankpilot._native`` (PyO3)."""

from os import PathLike
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

class RoundContext:
    """What a policy may use besides the observation in one round."""

    ranks: list[int]
    """The rank set."""
    max_ranks: list[int]
    """min(d_in, d_out) per site."""
    unit_cost: list[float]
    """Cost of one rank unit per site, in the resource's unit."""
    resource: str
    """``channel``, ``compute`` or ``budget``."""
    estimated_budget: float
    """The round's budget implied by the noisy estimate."""
    conservative_budget: float
    """The estimate after the preset's safety margin (what a policy plans against)."""
    cost_coef: float
    """The reward's price of the resource, λ."""
    def __init__(
        self,
        ranks: list[int],
        max_ranks: list[int],
        unit_cost: list[float],
        resource: str,
        estimated_budget: float,
        conservative_budget: float,
        cost_coef: float,
    ) -> None: ...

class VecEnv:
    """``num_envs`` simulated environments of one preset, stepped together, auto-resetting."""

    num_envs: int
    n_sites: int
    rounds: int
    """Rounds per episode."""
    ranks: list[int]
    preset: str
    resource: str
    can_skip: bool
    site_names: list[str]
    def __init__(self, preset: str, num_envs: int = 1, seed: int = 0, reference_returns: bool = True) -> None: ...
    def reset(self, seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Environment i restarts from ``derive_seed(seed, i)``; returns ``(global [N, G], sites [N, n, S])``."""
    def reset_one(self, index: int, seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Environment ``index`` restarts from ``seed`` exactly; returns its ``(global [G], sites [n, S])``."""
    def observe(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
    def step(
        self, indices: npt.NDArray[np.int64], skip: npt.NDArray[np.bool_] | None = None
    ) -> tuple[
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
        npt.NDArray[np.bool_],
        list[dict[str, Any]],
    ]:
        """Rank indices ``[N, n]`` (and skips ``[N]``) in; ``(global, sites, rewards, dones, finished episodes)`` out."""
    def context(self, index: int) -> RoundContext: ...
    def rank_indices(self, index: int) -> list[int]: ...
    def oracle_plan(self, index: int) -> list[int]: ...

class Policy:
    """A ``rankpilot train`` checkpoint acting greedily."""

    path: str
    ranks: list[int]
    @staticmethod
    def load(path: str | PathLike[str]) -> Policy: ...
    def reset(self) -> None: ...
    def act(
        self, global_: npt.NDArray[np.float32], sites: npt.NDArray[np.float32], context: RoundContext
    ) -> list[int] | None: ...

class Controller:
    """The scheduler and resource of a real run whose loop lives in Python."""

    name: str
    budget_params: float
    simulated: bool
    resource_unit: str
    rank_set: list[int] | None
    def __init__(
        self,
        scheduler: str,
        sites: list[dict[str, Any]],
        budget: str,
        total_steps: int,
        rounds: int,
        resource: str | None = None,
        seed: int = 0,
        token_entropy: float = 0.5,
    ) -> None: ...
    def plan(
        self, round: int, step: int, readings: list[dict[str, Any]], loss: float, initial_loss: float
    ) -> tuple[list[int], bool, dict[str, float]]: ...
    def settle(self, ranks: list[int]) -> bool: ...
    def settle_skipped(self) -> None: ...
    def cost(self, ranks: list[int]) -> float: ...
    def save_state(self) -> str: ...
    def load_state(self, state: str) -> None: ...

def largest_rank(scheduler: str, budget: str, sites: list[dict[str, Any]]) -> int: ...
def global_feature_names() -> list[str]: ...
def site_feature_names() -> list[str]: ...
def preset_names() -> list[str]: ...
def derive_seed(seed: int, index: int) -> int: ...
